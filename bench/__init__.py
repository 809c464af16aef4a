"""Benchmarks (not tests): Rewind measured side by side with unprotected peers, as ratios."""
