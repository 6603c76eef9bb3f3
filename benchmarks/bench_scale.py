"""``python benchmarks/bench_scale.py [--quick] [--json PATH]``: the package's benchmark.

Runs :mod:`hipipc.benchmarks.bench_scale`.  The benchmark itself ships in the package (so
that ``hipipc bench`` works from a wheel); this script keeps the source checkout's command
working, installed or not.
"""

import sys
from pathlib import Path

# The package beside this directory: a checkout runs its own code, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hipipc.benchmarks.bench_scale import main, run  # noqa: E402

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
