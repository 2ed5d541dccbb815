"""The `jaxmlp` command: a thin layer that composes data -> model -> train -> evaluate -> plot.

Every expected failure is a `JaxmlpError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxmlp.errors import ConfigError, JaxmlpError, RunError


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


MAX_SAMPLES = 100_000
# With --resume the saved spec decides everything else; these options change no number.
RESUME_OPTIONS = {"resume", "quiet", "data", "checkpoint_every"}


def _schedule(args, default):
    """--lr/--lr-boundaries over the stage's default; a single --lr alone is a constant rate."""
    from jaxmlp.stages import Schedule

    if args.lr is None:
        rates = default.learning_rates
        bounds = default.boundaries if args.lr_boundaries is None else args.lr_boundaries
    else:
        rates = args.lr
        bounds = args.lr_boundaries
        if bounds is None:
            bounds = () if len(rates) == 1 else default.boundaries
    if len(rates) != len(bounds) + 1:
        raise ConfigError(f"the schedule has {len(rates)} rate(s) (--lr) and {len(bounds)} "
                          "boundary step(s) (--lr-boundaries); give one more rate than "
                          "boundaries, e.g. --lr 0.1,0.01 --lr-boundaries 100000")
    return Schedule(tuple(rates), tuple(bounds))


def _plan(args):
    """The run `jaxmlp train` asked for, validated; nothing is written here."""
    from jaxmlp import runs
    from jaxmlp.stages import SCHEDULES, check_stage
    from jaxmlp.train import TrainConfig

    if args.resume is not None:
        conflicts = sorted(args.given - RESUME_OPTIONS - {"command", "func"})
        if conflicts:
            flags = ", ".join("--" + c.replace("_", "-") for c in conflicts)
            raise ConfigError(f"--resume continues a run with its own saved settings; drop "
                              f"{flags} (to change settings, start a new run instead)")
        return runs.plan_resumed_run(
            args.resume, data=args.data if "data" in args.given else None,
            checkpoint_every=args.checkpoint_every if "checkpoint_every" in args.given else None)
    check_stage(args.stage)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                         schedule=_schedule(args, SCHEDULES[args.stage]),
                         optimizer=args.optimizer, chunk=args.checkpoint_every)
    return runs.plan_new_run(args.stage, seed=args.seed, config=config, data=args.data,
                             out=args.out, force=args.force, torch_stream=args.torch_stream,
                             block_size=args.block_size, n_embd=args.n_embd,
                             n_hidden=args.n_hidden)


def cmd_train(args) -> int:
    from jaxmlp import runs

    plan = _plan(args)  # everything is validated before anything is written
    try:
        m = runs.train_run(plan, progress=not args.quiet)
    except runs.Interrupted as e:
        print(f"jaxmlp train: interrupted; {e}", file=sys.stderr)
        return 130
    print(f"train {m['train']:.4f}  val {m['val']:.4f}  test {m['test']:.4f}  "
          f"({m['seconds']:.1f} s"
          + (f", {m['us_per_step']:.1f} us/step)" if m["us_per_step"] else ")"))
    print(f"wrote {plan.out}/ (metrics.json, checkpoint.msgpack, losses.npy, loss.png)")
    return 0


def _load_for_use(run: Path):
    """(spec, state) of a run for eval/sample; an unfinished run is used with a note."""
    from jaxmlp import checkpoint as ckpt

    ck = ckpt.load_checkpoint(run)
    if not ckpt.is_finished(run):
        print(f"note: {run} is unfinished (step {ck.step:,} of {ck.spec.train.steps:,}); using "
              "its last checkpoint", file=sys.stderr)
    return ck.spec, ck.state


def cmd_eval(args) -> int:
    from jaxmlp.data import load_dataset
    from jaxmlp.evaluate import calibrate, split_losses

    spec, state = _load_for_use(args.run)
    data = load_dataset(args.data or spec.data, block_size=spec.model.block_size,
                        vocab=spec.vocab)
    variables = state.variables
    if args.calibrate:
        variables = calibrate(variables, data.train.X, model=spec.model)
    for split, loss in split_losses(spec.model, variables, data).items():
        print(f"{split:5s} {loss:.4f}")
    return 0


def cmd_sample(args) -> int:
    import jax

    from jaxmlp.evaluate import sample_names

    if not 1 <= args.n <= MAX_SAMPLES:
        raise ConfigError(f"-n must be a number of names from 1 to {MAX_SAMPLES:,}, got {args.n}")
    from jaxmlp.runs import check_seed

    check_seed(args.seed)
    spec, state = _load_for_use(args.run)
    variables = state.variables
    for name in sample_names(spec.model, variables, spec.vocab, jax.random.key(args.seed),
                             num=args.n):
        print(name)
    return 0


def cmd_diagnose(args) -> int:
    import datetime
    import platform

    import jax

    from jaxmlp import diagnostics as diag
    from jaxmlp import runs
    from jaxmlp.checkpoint import write_json
    from jaxmlp.data import load_dataset
    from jaxmlp.evaluate import split_losses
    from jaxmlp.figures import write_diagnosis_figures
    from jaxmlp.stages import DEEP_STAGES, SCHEDULES, check_stage, make_model
    from jaxmlp.train import TrainConfig, create_train_state

    check_stage(args.stage)
    threshold = args.threshold or (diag.DEEP_SATURATION if args.stage in DEEP_STAGES
                                   else diag.SHALLOW_SATURATION)
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold must lie in (0, 1), got {threshold}")
    stats_every = args.stats_every
    diag.check_intervals(args.steps, args.every, stats_every)
    if args.torch_stream:
        from jaxmlp.torch_bridge import import_torch

        import_torch()  # fail before anything else when torch is missing
    out = Path(args.out or f"runs/diagnose-{args.stage}-"
                           f"{'torch' if args.torch_stream else f's{args.seed}'}")
    runs.check_report_dir(out, args.force)
    data = load_dataset(args.data)
    model = make_model(args.stage, data.vocab.size)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                         schedule=SCHEDULES[args.stage]).validate(batchnorm=model.batchnorm)

    if args.torch_stream:  # the lecture's tensors, its batches and the snapshot's batch after
        import dataclasses

        from jaxmlp.torch_bridge import lecture_stream

        longer = dataclasses.replace(config, steps=config.steps + 1)
        state, batch_ix = lecture_stream(model, longer, len(data.train.X))
    else:
        state, batch_ix = create_train_state(jax.random.key(args.seed), model, config), None
    where = "the lecture's torch stream" if args.torch_stream else f"seed {args.seed}"
    print(f"diagnosing {args.stage} for {args.steps:,} steps ({where}, on "
          f"{jax.devices()[0].platform})")
    d = diag.diagnose(state, *data.train, model, config, steps=args.steps, every=args.every,
                      stats_every=stats_every, threshold=threshold, batch_ix=batch_ix)
    losses = split_losses(model, d.state.variables, data, splits=("train", "val"))
    report = diag.to_json(d, stage=args.stage, seed=args.seed, split_losses=losses,
                          torch_stream=args.torch_stream,
                          backend=jax.devices()[0].platform, jax=jax.__version__,
                          machine=platform.machine(), date=datetime.date.today().isoformat())
    out.mkdir(parents=True, exist_ok=True)
    shapes = {w["name"]: w["shape"] for w in report["weights"]}
    figures = write_diagnosis_figures(d, out, args.stage, shapes)
    write_json(out / "diagnostics.json", report)
    for a in report["activations"]:
        print(f"{a['layer']:>7s}: mean {a['mean']:+.2f}, std {a['std']:.2f}, "
              f"saturated {100 * a['saturated']:.2f}%, dead {report['dead_units'][a['layer']]}")
    print(f"train {losses['train']:.4f}  val {losses['val']:.4f}  ({d.seconds:.1f} s, "
          f"{d.compile_seconds:.1f} s compiling)")
    print(f"wrote {out}/diagnostics.json and {len(figures)} figures")
    return 0


def cmd_reproduce(args) -> int:
    from jaxmlp import runs
    from jaxmlp.data import load_dataset
    from jaxmlp.reproduce import markdown_report, reproduce, write_report

    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    out = Path(args.out or ("runs/reproduce-torch" if args.torch_stream else
                            f"runs/reproduce-s{args.seed}"))
    runs.check_report_dir(out, args.force)
    if args.torch_stream:
        from jaxmlp.torch_bridge import import_torch

        import_torch()  # fail before training, not after the first stage
    data = load_dataset(args.data)
    results = reproduce(data, stages=args.stages, steps=args.steps,
                        torch_stream=args.torch_stream, seed=args.seed,
                        log=None if args.quiet else print)
    json_path, md_path = write_report(out, results, steps=args.steps,
                                      torch_stream=args.torch_stream, seed=args.seed)
    print(markdown_report(results, steps=args.steps, torch_stream=args.torch_stream,
                          seed=args.seed))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _stage_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_sweep(args) -> int:
    import os
    import time

    from jaxmlp import runs, sweep
    from jaxmlp.data import load_dataset
    from jaxmlp.stages import STAGES, check_stage

    stages = args.stages or list(STAGES)
    for stage in stages:
        check_stage(stage)
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise ConfigError(f"--cpu-devices must be a positive integer, got {args.cpu_devices}")
    manual = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in manual) and None in manual:
        raise ConfigError("--coordinator, --num-processes and --process-id go together; give "
                          "all three, or --distributed alone on a cluster JAX detects")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id must be in 0 .. {args.num_processes - 1}, got "
                          f"{args.process_id}")
    out = Path(args.out)
    runs.check_report_dir(out, args.force)
    # Before JAX starts: on a CPU host, one XLA device per core (each trains a share of runs).
    sweep.configure_cpu_devices(args.cpu_devices or sweep.cpu_devices_for(
        args.seeds * len(stages), os.cpu_count()))
    import jax

    if args.distributed or args.coordinator:
        # One process per host; the runs spread over every host's devices. CPU hosts gather
        # the losses over gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    data = load_dataset(args.data)
    first = jax.process_index() == 0
    hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    if first:
        print(f"sweep: {', '.join(stages)} x {args.seeds} seeds on {jax.device_count()} "
              f"{jax.default_backend()} device(s){hosts}")
    t0 = time.perf_counter()
    results = sweep.run_sweep(stages, range(args.seeds), data, steps=args.steps,
                              progress=first and not args.quiet, log=print if first else None)
    seconds = time.perf_counter() - t0
    if not first:
        return 0  # every process holds all results; the first one writes them
    out.mkdir(parents=True, exist_ok=True)
    sweep.write_sweep_json(results, out / "sweep.json")
    sweep.write_sweep_markdown(results, out / "sweep.md", sweep.sweep_meta(results, seconds))
    sweep.plot_sweep(results, out / "sweep.png")
    print(sweep.sweep_markdown(results), end="")
    print(f"{seconds:.1f} s; wrote {out}/ (sweep.json, sweep.md, sweep.png)")
    return 0


def cmd_bench(args) -> int:
    import os

    from jaxmlp import bench, sweep

    for name in ("steps", "torch_steps", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, "
                              f"got {value}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise ConfigError(f"--cpu-devices must be a positive integer, got {args.cpu_devices}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} is a file; choose a directory path")
    sweep.configure_cpu_devices(args.cpu_devices or os.cpu_count() or 1)
    result = bench.run_bench(steps=args.steps, torch_steps=args.torch_steps, full=args.full,
                             data_path=str(args.data), repeats=args.repeats)
    path = bench.write_bench(result, out)
    print(bench.format_table(result), end="")
    print(f"wrote {path}")
    return 0


def build_parser() -> Parser:
    from jaxmlp.data import DEFAULT_DATA
    from jaxmlp.stages import stage_names

    p = Parser(prog="jaxmlp", description="The makemore-part-3 names MLP in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a stage, write DIR/metrics.json, checkpoint, loss.png")
    t.add_argument("--stage", default="batchnorm", help=f"one of {', '.join(stage_names())}")
    t.add_argument("--steps", type=int, default=200_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--data", type=Path, default=DEFAULT_DATA, help="names file, one per line")
    t.add_argument("--out", type=Path, help="run directory (default runs/<stage>-s<seed>)")
    t.add_argument("--force", action="store_true",
                   help="replace an existing run in --out (only once the new run has finished)")
    t.add_argument("--lr", type=_float_list, help="learning rates, e.g. 0.1,0.01")
    t.add_argument("--lr-boundaries", type=_int_list, help="steps where the rate drops, e.g. "
                   "100000")
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    t.add_argument("--block-size", type=int, default=3, help="context length")
    t.add_argument("--n-embd", type=int, default=10, help="embedding size")
    t.add_argument("--n-hidden", type=int, help="hidden units (default: the stage's, 200 or 100)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--torch-stream", action="store_true",
                   help="start from the PyTorch lecture's initial tensors and take its "
                   "minibatches (needs torch; --seed is then unused)")
    t.add_argument("--checkpoint-every", type=int, default=10_000, metavar="N",
                   help="save the whole training state every N steps (default 10000)")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint, with its own settings")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="print the split losses of a saved run")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--data", type=Path, help="names file (default: the run's)")
    e.add_argument("--calibrate", action="store_true",
                   help="batch-norm statistics over the whole training set, not running ones")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="print names sampled from a saved run")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("-n", type=int, default=20, help="how many names")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    g = sub.add_parser("diagnose", help="train briefly with diagnostics; write "
                       "DIR/diagnostics.json and the lecture's figures")
    g.add_argument("--stage", default="deep", help=f"one of {', '.join(stage_names())}")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--data", type=Path, default=DEFAULT_DATA, help="names file, one per line")
    g.add_argument("--out", type=Path, help="folder (default runs/diagnose-<stage>-s<seed>, "
                   "or -torch)")
    g.add_argument("--force", action="store_true", help="overwrite an existing --out")
    g.add_argument("--every", type=int, default=1,
                   help="record the update ratios every K steps (default every step)")
    g.add_argument("--stats-every", type=int, default=0,
                   help="also record layer statistics every K steps (a multiple of --every; "
                   "default 0: only the snapshots before and after)")
    g.add_argument("--torch-stream", action="store_true",
                   help="start from the PyTorch lecture's initial tensors and take its "
                   "minibatches (needs torch; --seed is then unused)")
    g.add_argument("--threshold", type=float,
                   help="saturation threshold of |tanh| (default 0.97 deep, 0.99 shallow)")
    g.set_defaults(func=cmd_diagnose)

    r = sub.add_parser("reproduce", help="train the lecture's stages (default the five), write "
                       "DIR/reproduce.json and DIR/reproduce.md beside its PyTorch figures")
    r.add_argument("--torch-stream", action="store_true",
                   help="the PyTorch lecture's initial tensors and minibatches (needs torch)")
    r.add_argument("--steps", type=int, default=200_000)
    r.add_argument("--seed", type=int, default=0, help="JAX seed (without --torch-stream)")
    r.add_argument("--stages", type=lambda text: [x for x in text.split(",") if x],
                   help=f"comma-separated subset (default all: {','.join(stage_names())})")
    r.add_argument("--data", type=Path, default=DEFAULT_DATA, help="names file, one per line")
    r.add_argument("--out", type=Path, help="output directory (default runs/reproduce-torch "
                   "or runs/reproduce-s<seed>)")
    r.add_argument("--force", action="store_true", help="overwrite an existing --out")
    r.add_argument("--quiet", action="store_true", help="print only the final table")
    r.set_defaults(func=cmd_reproduce)

    w = sub.add_parser("sweep", help="train stages x seeds at once (vmap, sharded over devices), "
                       "write DIR/sweep.json, sweep.md, sweep.png")
    w.add_argument("--stages", type=_stage_list, help="comma-separated stages (default: the "
                   "five lecture stages)")
    w.add_argument("--seeds", type=int, default=8, help="seeds per stage (0 .. K-1)")
    w.add_argument("--steps", type=int, help="steps per run (default 200000)")
    w.add_argument("--data", type=Path, default=DEFAULT_DATA, help="names file, one per line")
    w.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output directory")
    w.add_argument("--force", action="store_true", help="overwrite an existing sweep in --out")
    w.add_argument("--cpu-devices", type=int, help="XLA devices to split a CPU host into "
                   "(default: one per core; ignored on GPU/TPU)")
    w.add_argument("--distributed", action="store_true", help="run the same command on every "
                   "host: jax.distributed.initialize() finds the others (SLURM, Open MPI, Cloud "
                   "TPU, Kubernetes) or takes --coordinator, --num-processes, --process-id")
    w.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    w.add_argument("--num-processes", type=int, help="number of processes (hosts)")
    w.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", help="time the PyTorch lecture loop, a jaxmlp run and sweeps "
                       "side by side; write DIR/bench.json")
    b.add_argument("--steps", type=int, default=10_000, help="steps per jaxmlp measurement")
    b.add_argument("--torch-steps", type=int, help="steps per PyTorch measurement "
                   "(default min(steps, 3000))")
    b.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    b.add_argument("--full", action="store_true", help="also time `jaxmlp train` and the "
                   "PyTorch loop at 200,000 vs 20,000 steps from outside (minutes)")
    b.add_argument("--data", type=Path, default=DEFAULT_DATA, help="names file, one per line")
    b.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    b.add_argument("--cpu-devices", type=int, help="XLA devices to split a CPU host into for "
                   "the sweeps (default: one per core)")
    b.set_defaults(func=cmd_bench)
    return p


def _given_options(argv: list[str]) -> set[str]:
    """The options typed on the command line: argparse alone cannot tell `--steps 200000` from
    the default. Parses again with every default suppressed."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return set(vars(parser.parse_known_args(argv)[0]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = _given_options(argv)
    try:
        return args.func(args)
    except JaxmlpError as e:
        print(f"jaxmlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxmlp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
