"""SIGKILL a training run at a random moment, resume it, compare with an uninterrupted run.

    PYTHONPATH=. python experiments/kill_resume.py                 # the lecture's 200,000 steps
    PYTHONPATH=. python experiments/kill_resume.py --steps 30000 --checkpoint-every 1000

Trains `jaxmlp train` once without interruption (timing it), then again, killed with SIGKILL
at a uniformly random fraction (--kill-between) of that time, then `jaxmlp train --resume`.
Prints the step of the last checkpoint before the kill and whether the final metrics (all but
timings), every step's loss, the final parameters/statistics/optimizer state and the sampled
names are bit-identical. Runs one training process at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxmlp import checkpoint as ckpt

TIMINGS = {"seconds", "compile_seconds", "us_per_step", "resumed_from_step", "date"}


def train(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxmlp", "train", "--quiet", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def samples(run: Path) -> str:
    return subprocess.run([sys.executable, "-m", "jaxmlp", "sample", "--run", str(run), "-n",
                           "50", "--seed", "3"], capture_output=True, text=True, check=True).stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="batchnorm")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--checkpoint-every", type=int, default=10_000)
    p.add_argument("--n-hidden", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    p.add_argument("--kill-seed", type=int, default=None, help="seed of the kill moment")
    p.add_argument("--kill-between", type=float, nargs=2, default=(0.3, 0.9),
                   metavar=("LO", "HI"), help="fractions of the uninterrupted wall time")
    p.add_argument("--dir", type=Path, help="where to put the two runs (default: a temp dir)")
    args = p.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    a, b = root / "uninterrupted", root / "killed"
    common = ["--stage", args.stage, "--steps", str(args.steps), "--seed", str(args.seed),
              "--checkpoint-every", str(args.checkpoint_every), "--n-hidden", str(args.n_hidden)]

    t0 = time.perf_counter()
    proc = train([*common, "--out", str(a)])
    if proc.wait() != 0:
        sys.exit(proc.stderr.read().decode())
    whole_seconds = time.perf_counter() - t0

    fraction = random.Random(args.kill_seed).uniform(*args.kill_between)
    proc = train([*common, "--out", str(b)])
    time.sleep(fraction * whole_seconds)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    if code != -signal.SIGKILL:
        sys.exit(f"the run ended (exit {code}) before the kill; use a larger --steps")
    killed_at = ckpt.load_checkpoint(b).step
    leftovers = sorted(q.name for q in b.iterdir())

    t1 = time.perf_counter()
    proc = train(["--resume", str(b)])
    if proc.wait() != 0:
        sys.exit(proc.stderr.read().decode())
    resume_seconds = time.perf_counter() - t1

    ma, mb = (json.loads((d / ckpt.METRICS_FILE).read_text()) for d in (a, b))
    same_metrics = ({k: v for k, v in ma.items() if k not in TIMINGS}
                    == {k: v for k, v in mb.items() if k not in TIMINGS})
    same_losses = np.array_equal(np.load(a / ckpt.LOSSES_FILE), np.load(b / ckpt.LOSSES_FILE))
    ca, cb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    leaves = [jax.tree.leaves(c.state.replace(key=jax.random.key_data(c.state.key)))
              for c in (ca, cb)]
    same_state = all(np.array_equal(x, y) for x, y in zip(*leaves, strict=True))
    same_samples = samples(a) == samples(b)
    report = {
        "steps": args.steps, "checkpoint_every": args.checkpoint_every, "stage": args.stage,
        "n_hidden": args.n_hidden, "killed_after_seconds": round(fraction * whole_seconds, 1),
        "last_checkpoint_before_kill": killed_at, "files_left_by_the_kill": leftovers,
        "uninterrupted_seconds": round(whole_seconds, 1),
        "resume_seconds": round(resume_seconds, 1),
        "final": {k: ma[k] for k in ("train", "val", "test")},
        "identical": {"metrics_but_timings": same_metrics, "step_losses": same_losses,
                      "state": same_state, "samples": same_samples},
        "jax": jax.__version__, "backend": jax.default_backend(),
    }
    print(json.dumps(report, indent=1))
    return 0 if same_metrics and same_losses and same_state and same_samples else 1


if __name__ == "__main__":
    sys.exit(main())
