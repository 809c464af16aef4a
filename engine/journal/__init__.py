"""The journal: append-only segment files holding every write in the order it was applied."""
