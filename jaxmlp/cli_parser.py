"""The `jaxmlp` command line: its subcommands and options, declared once (shared parent
parsers), with the types that check them as they are parsed. `jaxmlp.cli` runs them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def _stage(text: str) -> str:
    from jaxmlp.stages import stage_names

    if text not in stage_names():
        raise argparse.ArgumentTypeError(f"unknown stage {text!r}; choose one of "
                                         f"{', '.join(stage_names())}")
    return text


def _stage_list(text: str) -> list[str]:
    return [_stage(x.strip()) for x in text.split(",") if x.strip()]


def _common(**flags) -> Parser:
    """A parent parser of shared options, so each is declared once."""
    from jaxmlp.data import DEFAULT_DATA

    p = Parser(add_help=False)
    if "data" in flags:
        p.add_argument("--data", type=Path, default=flags["data"], help="names file, one per "
                       f"line (default: {flags['data'] or 'the bundled ' + str(DEFAULT_DATA)})")
    if "out" in flags:
        p.add_argument("--out", type=Path, default=flags["out"], help="output directory "
                       f"(default {flags['out'] or 'runs/<name of the run>'})")
        p.add_argument("--force", action="store_true", help="replace what --out holds (only "
                       "jaxmlp's own files, once the new results exist)")
    if "seed" in flags:
        p.add_argument("--seed", type=int, default=flags["seed"], help="JAX seed (default 0)")
    if "quiet" in flags:
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    if "torch_stream" in flags:
        p.add_argument("--torch-stream", action="store_true", help="start from the PyTorch "
                       "lecture's initial tensors and take its minibatches (needs torch; "
                       "--seed is then unused)")
    return p


def _variant_flags(p) -> None:
    """The deep network's variants (stages deep and deep-nobn), recorded in run.json."""
    from jaxmlp.models import ACTIVATIONS, NORMS

    p.add_argument("--norm", choices=NORMS, help="deep stages: the normalisation (default "
                   "batchnorm for deep, none for deep-nobn)")
    p.add_argument("--activation", choices=ACTIVATIONS, help="deep stages (default tanh)")
    p.add_argument("--gain", type=float, help="deep stages: the Linear weights' initial gain "
                   "(default 1 for deep, 5/3 for deep-nobn)")
    p.add_argument("--depth", type=int, help="deep stages: hidden blocks (default 5)")


def build_parser(commands: dict[str, Callable]) -> Parser:
    """The `jaxmlp` parser; `commands` maps each subcommand's name to the function it runs."""
    from jaxmlp.data import DEFAULT_DATA
    from jaxmlp.train import TrainConfig

    d = TrainConfig()
    p = Parser(prog="jaxmlp", description="The makemore-part-3 names MLP in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    stages = "STAGE"

    t = sub.add_parser("train", parents=[_common(data=None, out=None, seed=None, quiet=1,
                                                 torch_stream=1)],
                       help="train a stage, write DIR/metrics.json, checkpoint, loss.png")
    t.add_argument("--stage", type=_stage, metavar=stages, help="original, softmax-fix, "
                   "tanh-fix, kaiming, batchnorm (default), deep or deep-nobn")
    t.add_argument("--steps", type=int, help=f"default {d.steps:,}")
    t.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    t.add_argument("--lr", type=_float_list, help="learning rates, e.g. 0.1,0.01 (default: "
                   "the stage's schedule)")
    t.add_argument("--lr-boundaries", type=_int_list, help="steps where the rate drops, e.g. "
                   "100000")
    t.add_argument("--optimizer", choices=("sgd", "adam"), help=f"default {d.optimizer}")
    t.add_argument("--block-size", type=int, help="context length (default 3)")
    t.add_argument("--n-embd", type=int, help="embedding size (default 10)")
    t.add_argument("--n-hidden", type=int, help="hidden units (default: the stage's, 200 or 100)")
    t.add_argument("--bn-epsilon", type=float, help="batch norm's epsilon (default: the "
                   "stage's: 0 for batchnorm, as the lecture; 1e-5 for deep)")
    _variant_flags(t)
    t.add_argument("--checkpoint-every", type=int, metavar="N", help="save the whole training "
                   f"state every N steps (default {d.chunk:,})")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint, with its own settings")
    t.add_argument("--profile", action="store_true", help="print where the command's time "
                   "went (start-up, imports, data, init, compile, train, evaluate, write)")
    t.set_defaults(func=commands["train"])

    e = sub.add_parser("eval", parents=[_common(data=None)],
                       help="print the split losses of a saved run")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--calibrate", action="store_true",
                   help="batch-norm statistics over the whole training set, not running ones")
    e.set_defaults(func=commands["eval"])

    s = sub.add_parser("sample", parents=[_common(seed=0)],
                       help="print names sampled from a saved run")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("-n", type=int, default=20, help="how many names (default 20)")
    s.set_defaults(func=commands["sample"])

    g = sub.add_parser("diagnose", parents=[_common(data=DEFAULT_DATA, out=None, seed=0,
                                                    torch_stream=1)],
                       help="train briefly with diagnostics; write DIR/diagnostics.json and "
                       "the lecture's figures")
    g.add_argument("--stage", type=_stage, default="deep", metavar=stages,
                   help="default deep")
    g.add_argument("--steps", type=int, default=1000, help="default 1,000")
    g.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    g.add_argument("--every", type=int, default=1,
                   help="record the update ratios every K steps (default every step)")
    g.add_argument("--stats-every", type=int, default=0,
                   help="also record layer statistics every K steps (a multiple of --every; "
                   "default 0: only the snapshots before and after)")
    g.add_argument("--threshold", type=float,
                   help="saturation threshold of |tanh| (default 0.97 deep, 0.99 shallow)")
    _variant_flags(g)
    g.set_defaults(func=commands["diagnose"])

    r = sub.add_parser("reproduce", parents=[_common(data=DEFAULT_DATA, out=None, seed=0,
                                                     quiet=1, torch_stream=1)],
                       help="train the lecture's stages (default the five), write "
                       "DIR/reproduce.json and DIR/reproduce.md beside its PyTorch figures")
    r.add_argument("--steps", type=int, default=d.steps, help=f"default {d.steps:,}")
    r.add_argument("--stages", type=_stage_list, help="comma-separated subset (default the "
                   "five: original,softmax-fix,tanh-fix,kaiming,batchnorm; also deep,deep-nobn)")
    r.set_defaults(func=commands["reproduce"])

    w = sub.add_parser("sweep", parents=[_common(data=DEFAULT_DATA, out=Path("runs/sweep"),
                                                 quiet=1)],
                       help="train stages x seeds at once (vmap, sharded over devices), "
                       "write DIR/sweep.json, sweep.md, sweep.png")
    w.add_argument("--stages", type=_stage_list, help="comma-separated stages (default: the "
                   "five lecture stages)")
    w.add_argument("--seeds", type=int, default=8, help="seeds per stage, 0 .. K-1 (default 8)")
    w.add_argument("--steps", type=int, help=f"steps per run (default {d.steps:,})")
    w.add_argument("--lr", type=_float_list, help="learning rates to sweep, e.g. "
                   "0.02,0.05,0.1,0.2: each the first rate of the stage's schedule (the later "
                   "ones scaled with it); stages x rates x seeds, one compiled program per model")
    _variant_flags(w)
    w.add_argument("--cpu-devices", type=int, help="XLA devices to split a CPU host into "
                   "(default: one per core; ignored on GPU/TPU)")
    w.add_argument("--vmap-width", type=int, metavar="N", help="runs each device trains at "
                   "once in one vmap (default: per platform: all of a GPU's or TPU's, "
                   "the measured best on a CPU)")
    w.add_argument("--distributed", action="store_true", help="run the same command on every "
                   "host: jax.distributed.initialize() finds the others (SLURM, Open MPI, Cloud "
                   "TPU, Kubernetes) or takes --coordinator, --num-processes, --process-id")
    w.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    w.add_argument("--num-processes", type=int, help="number of processes (hosts)")
    w.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    w.set_defaults(func=commands["sweep"])

    b = sub.add_parser("bench", parents=[_common(data=DEFAULT_DATA, out=Path("runs/bench"))],
                       help="time the PyTorch lecture loop, a jaxmlp run and sweeps side by "
                       "side; write DIR/bench.json")
    b.add_argument("--steps", type=int, default=10_000, help="steps per jaxmlp measurement")
    b.add_argument("--torch-steps", type=int, help="steps per PyTorch measurement "
                   "(default min(steps, 3000))")
    b.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    b.add_argument("--full", action="store_true", help="also time `jaxmlp train` and the "
                   "PyTorch loop at 200,000 vs 20,000 steps from outside (minutes)")
    b.add_argument("--e2e", action="store_true", help="also time, each in a fresh process, "
                   "`jaxmlp train` (200,000 and 2,000 steps, cold and warm compilation cache) "
                   "against the PyTorch lecture script and `import jax, flax, optax` (minutes)")
    b.add_argument("--e2e-steps", type=_int_list, metavar="LONG,SHORT",
                   help="the two run lengths of --e2e (default: the lecture's, and 1%% of it)")
    b.add_argument("--cpu-devices", type=int, help="XLA devices to split a CPU host into for "
                   "the sweeps (default: one per core)")
    b.set_defaults(func=commands["bench"])
    return p


# The train options whose default is None (or False): typed on the command line when set.
TRAIN_DEFAULTS = {"stage", "steps", "batch_size", "lr", "lr_boundaries", "optimizer",
                  "block_size", "n_embd", "n_hidden", "bn_epsilon", "norm", "activation", "gain",
                  "depth", "checkpoint_every", "seed", "data", "out", "force", "torch_stream",
                  "quiet", "resume", "profile"}


