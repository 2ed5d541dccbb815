"""The `jaxmlp` command: a thin layer that composes data -> model -> train -> evaluate -> plot.

Every expected failure is a `JaxmlpError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import datetime
import platform
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


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(f"--out {str(out)!r} already holds a run; pass --force to overwrite it "
                       "or choose another --out")


def cmd_train(args) -> int:
    import jax
    import numpy as np

    from jaxmlp import checkpoint as ckpt
    from jaxmlp.data import load_dataset
    from jaxmlp.evaluate import calibrate, split_losses
    from jaxmlp.plot import plot_loss
    from jaxmlp.stages import SCHEDULES, Schedule, check_stage, make_model
    from jaxmlp.train import TrainConfig, create_train_state, fit

    check_stage(args.stage)
    default = SCHEDULES[args.stage]
    schedule = Schedule(args.lr or default.learning_rates,
                        default.boundaries if args.lr_boundaries is None else args.lr_boundaries)
    data = load_dataset(args.data, block_size=args.block_size)
    model = make_model(args.stage, data.vocab.size, block_size=args.block_size,
                       n_embd=args.n_embd, n_hidden=args.n_hidden)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, schedule=schedule,
                         optimizer=args.optimizer).validate(batchnorm=model.batchnorm)
    out = Path(args.out or f"runs/{args.stage}-s{args.seed}")
    _check_out_dir(out, args.force)

    state = create_train_state(jax.random.key(args.seed), model, config)
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    print(f"stage {args.stage}: {n_params:,} parameters, {config.steps:,} steps, "
          f"seed {args.seed}, on {jax.devices()[0].platform}")
    result = fit(state, *data.train, model, config, progress=not args.quiet)
    variables = result.state.variables
    losses = split_losses(model, variables, data)
    metrics = {
        "stage": args.stage, "seed": args.seed, "steps": config.steps, "params": n_params,
        **losses,
        "seconds": result.seconds, "compile_seconds": result.compile_seconds,
        "us_per_step": (result.seconds - result.compile_seconds) / config.steps * 1e6,
        "step_losses": {str(i): float(result.losses[i]) for i in range(0, config.steps, 10_000)},
        "backend": jax.devices()[0].platform, "jax": jax.__version__,
        "machine": platform.machine(), "date": datetime.date.today().isoformat(),
    }
    if model.batchnorm:
        metrics["calibrated"] = split_losses(
            model, calibrate(variables, data.train.X, model=model), data)
    spec = ckpt.RunSpec(args.stage, args.seed, model, config, data.vocab, str(args.data))
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_run(out, spec, result.state)
    ckpt.write_json(out / ckpt.METRICS_FILE, metrics)
    np.save(out / "losses.npy", result.losses)  # every step's minibatch loss
    plot_loss(result.losses, out / "loss.png", title=f"{args.stage}, seed {args.seed}")
    print(f"train {losses['train']:.4f}  val {losses['val']:.4f}  test {losses['test']:.4f}  "
          f"({result.seconds:.1f} s, {metrics['us_per_step']:.1f} us/step)")
    print(f"wrote {out}/ (metrics.json, checkpoint.msgpack, loss.png)")
    return 0


def cmd_eval(args) -> int:
    from jaxmlp.checkpoint import load_run
    from jaxmlp.data import load_dataset
    from jaxmlp.evaluate import calibrate, split_losses

    spec, state = load_run(args.run)
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

    from jaxmlp.checkpoint import load_run
    from jaxmlp.evaluate import sample_names

    if args.n < 1:
        raise ConfigError(f"-n must be a positive integer, got {args.n}")
    spec, state = load_run(args.run)
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
    out = Path(args.out or f"runs/diagnose-{args.stage}-s{args.seed}")
    _check_out_dir(out, args.force)
    data = load_dataset(args.data)
    model = make_model(args.stage, data.vocab.size)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                         schedule=SCHEDULES[args.stage]).validate(batchnorm=model.batchnorm)

    state = create_train_state(jax.random.key(args.seed), model, config)
    print(f"diagnosing {args.stage} for {args.steps:,} steps (seed {args.seed}, on "
          f"{jax.devices()[0].platform})")
    d = diag.diagnose(state, *data.train, model, config, steps=args.steps, every=args.every,
                      stats_every=stats_every, threshold=threshold)
    losses = split_losses(model, d.state.variables, data, splits=("train", "val"))
    report = diag.to_json(d, stage=args.stage, seed=args.seed, split_losses=losses,
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
    t.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    t.add_argument("--lr", type=_float_list, help="learning rates, e.g. 0.1,0.01")
    t.add_argument("--lr-boundaries", type=_int_list, help="steps where the rate drops, e.g. "
                   "100000")
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    t.add_argument("--block-size", type=int, default=3, help="context length")
    t.add_argument("--n-embd", type=int, default=10, help="embedding size")
    t.add_argument("--n-hidden", type=int, help="hidden units (default: the stage's, 200 or 100)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
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
    g.add_argument("--out", type=Path, help="folder (default runs/diagnose-<stage>-s<seed>)")
    g.add_argument("--force", action="store_true", help="overwrite an existing --out")
    g.add_argument("--every", type=int, default=1,
                   help="record the update ratios every K steps (default every step)")
    g.add_argument("--stats-every", type=int, default=0,
                   help="also record layer statistics every K steps (a multiple of --every; "
                   "default 0: only the snapshots before and after)")
    g.add_argument("--threshold", type=float,
                   help="saturation threshold of |tanh| (default 0.97 deep, 0.99 shallow)")
    g.set_defaults(func=cmd_diagnose)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
