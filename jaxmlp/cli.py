"""The `jaxmlp` command: each subcommand validates its options and calls one library function.

Every expected failure is a `JaxmlpError` (or a file-system error): one line on stderr, exit
code 2, no traceback. A closed output pipe (`jaxmlp sample | head -1`) ends quietly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxmlp.errors import ConfigError, JaxmlpError

MAX_SAMPLES = 100_000
# With --resume the saved spec decides everything else; these options change no number.
RESUME_OPTIONS = {"resume", "quiet", "data", "checkpoint_every", "profile"}


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


def _given(args, defaults: dict) -> set[str]:
    """The options typed on the command line (their defaults are None or False)."""
    return {k for k, v in vars(args).items() if k in defaults and v not in (None, False)}


def cmd_train(args) -> int:
    import time

    t0 = time.perf_counter()
    from jaxmlp import runs
    from jaxmlp.optim import schedule_from_flags
    from jaxmlp.stages import get_stage
    from jaxmlp.train import TrainConfig

    imports = (process_seconds() or 0.0) - args.started if args.started else (
        time.perf_counter() - t0)  # everything since main() started: jax is imported there

    if args.resume is not None:  # everything is validated before anything is written
        conflicts = sorted(_given(args, TRAIN_DEFAULTS) - RESUME_OPTIONS)
        if conflicts:
            flags = ", ".join("--" + c.replace("_", "-") for c in conflicts)
            raise ConfigError(f"--resume continues a run with its own saved settings; drop "
                              f"{flags} (to change settings, start a new run instead)")
        plan = runs.plan_resumed_run(args.resume, data=args.data,
                                     checkpoint_every=args.checkpoint_every)
    else:
        stage = args.stage or "batchnorm"
        defaults = TrainConfig()
        config = TrainConfig(steps=_or(args.steps, defaults.steps),
                             batch_size=_or(args.batch_size, defaults.batch_size),
                             schedule=schedule_from_flags(args.lr, args.lr_boundaries,
                                                          get_stage(stage).schedule),
                             optimizer=args.optimizer or defaults.optimizer,
                             chunk=_or(args.checkpoint_every, defaults.chunk))
        fields = _model_fields(args)
        plan = runs.plan_new_run(stage, seed=_or(args.seed, 0), config=config,
                                 data=_or(args.data, _default_data()), out=args.out,
                                 force=args.force, torch_stream=args.torch_stream,
                                 block_size=_or(args.block_size, 3), n_embd=_or(args.n_embd, 10),
                                 n_hidden=args.n_hidden, **fields)
    try:
        m = runs.train_run(plan, progress=not args.quiet)
    except runs.Interrupted as e:
        print(f"jaxmlp train: interrupted; {e}", file=sys.stderr)
        return 130
    print(f"train {m['train']:.4f}  val {m['val']:.4f}  test {m['test']:.4f}  "
          f"({m['seconds']:.1f} s"
          + (f", {m['us_per_step']:.1f} us/step)" if m["us_per_step"] else ")"))
    print(f"wrote {plan.out}/ (metrics.json, checkpoint.msgpack, losses.npy, loss.png)")
    if args.profile:
        t = {"start-up": args.started, "imports": imports, **plan.timings}
        print("where the time went (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
              + f"; total {process_seconds() or sum(t.values()):.2f}")
    return 0


def process_seconds() -> float | None:
    """Seconds since this process started (Linux), None elsewhere."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for the jaxmlp commands, so that a repeated command
    compiles nothing it compiled before. It lives in $XDG_CACHE_HOME/jaxmlp/jax (default
    ~/.cache/jaxmlp/jax); JAXMLP_CACHE_DIR moves it, JAXMLP_CACHE_DIR=off turns it off, and
    JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins. Its jaxmlp-programs/ folder keeps whole
    compiled programs (`program_cache`: no tracing either). Returns the directory used."""
    import os

    import jax

    from jaxmlp import program_cache

    where = os.environ.get("JAXMLP_CACHE_DIR")
    if (where or "").lower() in ("off", "0"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX's own setting: jaxmlp's beside it
        where = os.environ["JAX_COMPILATION_CACHE_DIR"]
        program_cache.set_dir(os.path.join(where, "jaxmlp-programs"))
        return where
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "jaxmlp", "jax")
    jax.config.update("jax_compilation_cache_dir", where)
    program_cache.set_dir(os.path.join(where, "jaxmlp-programs"))
    # Every program, however small or quick to compile: a command compiles dozens of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def _model_fields(args) -> dict:
    """The model fields set by flags; make_model refuses those that do not apply to a stage."""
    names = ("bn_epsilon", "norm", "activation", "gain", "depth")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got "
                              f"{value}")


def _or(value, default):
    return default if value is None else value


def _default_data() -> Path:
    from jaxmlp.data import DEFAULT_DATA

    return DEFAULT_DATA


def cmd_eval(args) -> int:
    from jaxmlp.evaluate import evaluate_run

    for split, loss in evaluate_run(args.run, data=args.data, calibrated=args.calibrate).items():
        print(f"{split:5s} {loss:.4f}")
    return 0


def cmd_sample(args) -> int:
    from jaxmlp.evaluate import sample_run
    from jaxmlp.limits import check_seed

    if not 1 <= args.n <= MAX_SAMPLES:
        raise ConfigError(f"-n must be a number of names from 1 to {MAX_SAMPLES:,}, got {args.n}")
    check_seed(args.seed)
    names = sample_run(args.run, num=args.n, seed=args.seed)
    encoding = sys.stdout.encoding or "utf-8"
    try:
        text = "".join(f"{name}\n" for name in names).encode(encoding)
    except UnicodeEncodeError as e:
        raise ConfigError(f"the names hold {e.object[e.start:e.end]!r}, which this terminal's "
                          f"encoding ({encoding}) cannot show; set PYTHONIOENCODING=utf-8"
                          ) from None
    sys.stdout.flush()
    sys.stdout.buffer.write(text)
    sys.stdout.flush()
    return 0


def cmd_diagnose(args) -> int:
    from jaxmlp.diagnosis import run_diagnosis

    run_diagnosis(args.stage, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                  every=args.every, stats_every=args.stats_every, threshold=args.threshold,
                  torch_stream=args.torch_stream, data=args.data, out=args.out,
                  force=args.force, **_model_fields(args))
    return 0


def cmd_reproduce(args) -> int:
    from jaxmlp.data import load_dataset
    from jaxmlp.limits import check_seed
    from jaxmlp.report import check_report_dir
    from jaxmlp.reproduce import markdown_report, reproduce, write_report

    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    check_seed(args.seed)
    out = Path(args.out or ("runs/reproduce-torch" if args.torch_stream else
                            f"runs/reproduce-s{args.seed}"))
    check_report_dir(out, args.force)
    if args.torch_stream:
        from jaxmlp.torch_bridge import import_torch

        import_torch()  # fail before training, not after the first stage
    results = reproduce(load_dataset(args.data), stages=args.stages, steps=args.steps,
                        torch_stream=args.torch_stream, seed=args.seed,
                        log=None if args.quiet else print)
    json_path, md_path = write_report(out, results, steps=args.steps,
                                      torch_stream=args.torch_stream, seed=args.seed)
    print(markdown_report(results, steps=args.steps, torch_stream=args.torch_stream,
                          seed=args.seed))
    print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_sweep(args) -> int:
    import os
    import time

    from jaxmlp import devices, limits, sweep
    from jaxmlp.report import check_report_dir, sweep_markdown, write_sweep
    from jaxmlp.stages import STAGES

    stages = list(STAGES) if args.stages is None else args.stages
    if not stages:
        raise ConfigError("--stages is empty; name at least one stage, e.g. --stages kaiming")
    _positive(args, "seeds", "steps", "cpu_devices", "vmap_width")
    manual = devices.check_hosts(args.coordinator, args.num_processes, args.process_id)
    limits.check_runs(args.seeds, len(stages) * len(args.lr or [None]))
    out = Path(args.out)
    check_report_dir(out, args.force)
    # Before JAX starts: on a CPU host, one XLA device per core (each trains a share of runs).
    devices.configure_cpu_devices(args.cpu_devices or devices.cpu_devices_for(
        args.seeds * len(stages) * len(args.lr or [1]), os.cpu_count()))
    import jax

    from jaxmlp.data import load_dataset

    if args.distributed or args.coordinator:
        devices.start_distributed(*manual)
    data = load_dataset(args.data)
    first = jax.process_index() == 0
    hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    if first:
        rates = f" x {len(args.lr)} learning rates" if args.lr else ""
        print(f"sweep: {', '.join(stages)} x {args.seeds} seeds{rates} on "
              f"{jax.device_count()} {jax.default_backend()} device(s){hosts}")
    t0 = time.perf_counter()
    results = sweep.run_sweep(stages, range(args.seeds), data, steps=args.steps, lrs=args.lr,
                              vmap_width=args.vmap_width, model_fields=_model_fields(args),
                              progress=first and not args.quiet, log=print if first else None)
    seconds = time.perf_counter() - t0
    if not first:
        return 0  # every process holds all results; the first one writes them
    write_sweep(results, out, seconds)
    print(sweep_markdown(results), end="")
    print(f"{seconds:.1f} s; wrote {out}/ (sweep.json, sweep.md, sweep.png)")
    return 0


def cmd_bench(args) -> int:
    import os

    from jaxmlp import bench, devices
    from jaxmlp.report import check_report_dir

    _positive(args, "steps", "torch_steps", "repeats", "cpu_devices")
    out = Path(args.out)
    check_report_dir(out, args.force)
    devices.configure_cpu_devices(args.cpu_devices or os.cpu_count() or 1)
    from jaxmlp.limits import MAX_STEPS

    e2e = None
    if args.e2e or args.e2e_steps or args.full:
        e2e = tuple(args.e2e_steps or (None, None))
        if args.e2e_steps and (len(e2e) != 2 or not 1 <= e2e[1] < e2e[0] <= MAX_STEPS):
            raise ConfigError(f"--e2e-steps takes two step counts, long then short (each from 1 "
                              f"to {MAX_STEPS:,}), e.g. 20000,200; got "
                              f"{','.join(map(str, e2e))}")
    result = bench.run_bench(steps=args.steps, torch_steps=args.torch_steps, full=args.full,
                             data_path=str(args.data), repeats=args.repeats, e2e_steps=e2e)
    path = bench.write_bench(result, out)
    print(bench.format_table(result), end="")
    print(f"wrote {path}")
    return 0


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


def build_parser() -> Parser:
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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", parents=[_common(data=None)],
                       help="print the split losses of a saved run")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--calibrate", action="store_true",
                   help="batch-norm statistics over the whole training set, not running ones")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", parents=[_common(seed=0)],
                       help="print names sampled from a saved run")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("-n", type=int, default=20, help="how many names (default 20)")
    s.set_defaults(func=cmd_sample)

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
    g.set_defaults(func=cmd_diagnose)

    r = sub.add_parser("reproduce", parents=[_common(data=DEFAULT_DATA, out=None, seed=0,
                                                     quiet=1, torch_stream=1)],
                       help="train the lecture's stages (default the five), write "
                       "DIR/reproduce.json and DIR/reproduce.md beside its PyTorch figures")
    r.add_argument("--steps", type=int, default=d.steps, help=f"default {d.steps:,}")
    r.add_argument("--stages", type=_stage_list, help="comma-separated subset (default the "
                   "five: original,softmax-fix,tanh-fix,kaiming,batchnorm; also deep,deep-nobn)")
    r.set_defaults(func=cmd_reproduce)

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
    w.set_defaults(func=cmd_sweep)

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
    b.set_defaults(func=cmd_bench)
    return p


# The train options whose default is None (or False): typed on the command line when set.
TRAIN_DEFAULTS = {"stage", "steps", "batch_size", "lr", "lr_boundaries", "optimizer",
                  "block_size", "n_embd", "n_hidden", "bn_epsilon", "norm", "activation", "gain",
                  "depth", "checkpoint_every", "seed", "data", "out", "force", "torch_stream",
                  "quiet", "resume", "profile"}


def main(argv: list[str] | None = None) -> int:
    started = process_seconds()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    args.started = started or 0.0
    name = f"jaxmlp {args.command}"
    try:
        enable_compilation_cache()
        return args.func(args)
    except JaxmlpError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the file system refused: a path, a permission, a full disk
        where = f" {e.filename!r}" if e.filename else ""
        print(f"{name}: error: cannot use{where} ({e.strerror or e}); check the path, its "
              "permissions and free space", file=sys.stderr)
        return 2
    except Exception as e:  # the device ran out of memory despite the estimates
        if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
            raise  # anything else is a bug: keep its traceback
        print(f"{name}: error: out of memory ({str(e).splitlines()[0][:120]}); use a smaller "
              "model, batch or sweep", file=sys.stderr)
        return 2


def run() -> None:
    """The `jaxmlp` command: `main()`, then exit at once. Tearing down JAX's runtime at exit
    takes a few tenths of a second and saves nothing: every file is written and flushed."""
    import os

    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # the reader went away, or closed
            code = code or 141
    os._exit(code)


if __name__ == "__main__":
    run()
