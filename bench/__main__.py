"""`make bench`: run every bench/bench_*.py in turn, each in its own process, and say which ran.

Pass --quick to shorten every run (smoke mode); other arguments go to each benchmark.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    failed = []
    for name in names:
        if only and name not in only and name.removeprefix("bench_") not in only:
            continue
        print(f"\n=== {name} ===", flush=True)
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", f"bench.{name}", *flags], cwd=here.parent)
        print(f"--- {name}: exit {r.returncode} in {time.monotonic() - t:.0f} s", flush=True)
        if r.returncode:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
