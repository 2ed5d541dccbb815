"""The speed benchmark: PyTorch's lecture loop vs jaxmlp, side by side in one run.

    python experiments/benchmark.py          # ~1 minute: the table and runs/bench/bench.json
    python experiments/benchmark.py --full   # + 200,000 vs 20,000 steps timed from outside
    python experiments/benchmark.py --steps 20000 --out runs/bench-20k

The same measurements as `jaxmlp bench` (jaxmlp/bench.py). Run it on a quiet machine: every
figure is a best-of-N, but other processes still slow both frameworks down.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxmlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
