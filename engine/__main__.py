"""`python -m rewind.engine ...` runs the command line (same as the `rewind` script)."""

import sys

from .cli import main

sys.exit(main())
