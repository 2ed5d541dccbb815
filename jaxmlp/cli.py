"""The `jaxmlp` command: each subcommand validates its options and calls one library function.

Every expected failure is a `JaxmlpError` (or a file-system error): one line on stderr, exit
code 2, no traceback. A closed output pipe (`jaxmlp sample | head -1`) ends quietly.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxmlp.cli_parser import TRAIN_DEFAULTS
from jaxmlp.cli_parser import build_parser as _build_parser
from jaxmlp.errors import ConfigError, JaxmlpError

MAX_SAMPLES = 100_000
# With --resume the saved spec decides everything else; these options change no number.
RESUME_OPTIONS = {"resume", "quiet", "data", "checkpoint_every", "profile"}


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

    from jaxmlp import bench, devices, program_cache
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
    with program_cache.off():  # compile times are compilations (the e2e part has its own)
        result = bench.run_bench(steps=args.steps, torch_steps=args.torch_steps, full=args.full,
                                 data_path=str(args.data), repeats=args.repeats, e2e_steps=e2e)
    path = bench.write_bench(result, out)
    print(bench.format_table(result), end="")
    print(f"wrote {path}")
    return 0


def build_parser():
    """The argument parser, each subcommand bound to its `cmd_*` function."""
    return _build_parser({"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample,
                          "diagnose": cmd_diagnose, "reproduce": cmd_reproduce,
                          "sweep": cmd_sweep, "bench": cmd_bench})


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
        from jaxmlp.program_cache import enable_compilation_cache

        if args.command != "bench":  # the benchmark times compilation itself, not a cache read
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
