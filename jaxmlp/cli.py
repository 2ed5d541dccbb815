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
    out = Path(args.out or f"runs/{args.stage}-{'torch' if args.torch_stream else f's{args.seed}'}")
    _check_out_dir(out, args.force)

    if args.torch_stream:  # the PyTorch lecture's initial tensors and minibatches
        from jaxmlp.torch_bridge import lecture_stream

        state, batch_ix = lecture_stream(model, config, len(data.train.X))
    else:
        state, batch_ix = create_train_state(jax.random.key(args.seed), model, config), None
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    print(f"stage {args.stage}: {n_params:,} parameters, {config.steps:,} steps, "
          f"{'the lecture torch stream' if args.torch_stream else f'seed {args.seed}'}, "
          f"on {jax.devices()[0].platform}")
    result = fit(state, *data.train, model, config, batch_ix=batch_ix, progress=not args.quiet)
    variables = result.state.variables
    losses = split_losses(model, variables, data)
    metrics = {
        "stage": args.stage, "seed": args.seed, "steps": config.steps, "params": n_params,
        "torch_stream": args.torch_stream,
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
    spec = ckpt.RunSpec(args.stage, args.seed, model, config, data.vocab, str(args.data),
                        torch_stream=args.torch_stream)
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


def cmd_reproduce(args) -> int:
    from jaxmlp.data import load_dataset
    from jaxmlp.reproduce import markdown_report, reproduce, write_report

    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    out = Path(args.out or ("runs/reproduce-torch" if args.torch_stream else
                            f"runs/reproduce-s{args.seed}"))
    _check_out_dir(out, args.force)
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
    t.add_argument("--n-hidden", type=int, default=200, help="hidden units")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--torch-stream", action="store_true",
                   help="start from the PyTorch lecture's initial tensors and take its "
                   "minibatches (needs torch; --seed is then unused)")
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

    r = sub.add_parser("reproduce", help="train all five stages, write DIR/reproduce.json and "
                       "DIR/reproduce.md beside the lecture's PyTorch figures")
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
