"""Training in a run directory: plan a new or resumed run, train it with checkpoints, finish it.

A run directory (files: `jaxmlp.checkpoint`) holds `run.json` (what made it),
`checkpoint.msgpack` (the whole training state, rewritten atomically every `config.chunk`
steps), and once finished `losses.npy`, `loss.png` and `metrics.json` (written last: its
presence marks the run finished).

    plan = plan_new_run("batchnorm", seed=0, out="runs/bn", config=TrainConfig())
    metrics = train_run(plan)             # or plan_resumed_run("runs/bn") after a crash

Planning validates everything and writes nothing, so a bad option leaves every file as it
was. `train_run` with `force` trains in `OUT.partial` and swaps it in only once it has
finished: a crash, a divergence or Ctrl-C in the new run leaves the earlier run whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmlp import checkpoint as ckpt
from jaxmlp.data import DEFAULT_DATA, Dataset, load_dataset
from jaxmlp.errors import ConfigError, DataError, DivergenceError, RunError
from jaxmlp.train import TrainConfig, TrainState

MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed: larger ones repeat smaller ones
MAX_PARAMS = 1 << 28  # 1 GiB of float32 parameters, before gradients and optimizer state


@dataclasses.dataclass
class RunPlan:
    """A validated run, ready for `train_run`: nothing of it is on disk yet.

    state/losses: where training starts (step 0, or a checkpoint with its (step,) losses).
    batch_ix: the PyTorch lecture's minibatches ((steps, B) int32) for a torch-stream run.
    workdir: where it trains; `out`, or `out.partial` when it replaces an earlier run (then
        `replaces` is that run's absolute path, else "").
    """

    spec: ckpt.RunSpec
    data: Dataset
    state: TrainState
    losses: np.ndarray
    data_sha256: str
    out: Path
    workdir: Path
    replaces: str = ""
    batch_ix: np.ndarray | None = None
    resumed: bool = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `train_run`; the message says where the last checkpoint is."""


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{flag} must be between 0 and {MAX_SEED} (JAX keys keep 32 bits of "
                          f"it), got {seed}")


def staging_dir(out: str | Path) -> Path:
    """Where a --force run trains until it finishes and replaces `out` (a sibling of it)."""
    out = Path(os.path.abspath(out))  # `--out .` has no name to extend
    return out.with_name(out.name + ".partial")


def check_out_dir(out: Path, force: bool) -> Path | None:
    """Validate a new run's directory before anything is written; returns the run that
    `force` will replace. Without `force` only a new or empty directory is accepted."""
    shown = str(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {shown!r} is a file; choose a directory path")
    if not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise RunError(f"cannot create --out {shown!r}: {str(parent)!r} is a file; choose "
                           "another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunError(f"cannot create --out {shown!r}: no permission to write in "
                           f"{str(parent)!r}; choose another --out")
        return None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunError(f"cannot write in --out {shown!r} (permission denied); choose another "
                       "--out")
    if not any(out.iterdir()):
        return None
    if not (out / ckpt.SPEC_FILE).is_file():
        raise RunError(f"--out {shown!r} is not empty and holds no jaxmlp run (no "
                       f"{ckpt.SPEC_FILE}); choose a new or empty directory")
    if not force:
        if ckpt.is_finished(out):
            raise RunError(f"--out {shown!r} already holds a finished run; pass --force to "
                           "replace it (once the new run finishes) or choose another --out")
        raise RunError(f"--out {shown!r} holds an unfinished run; continue it with --resume "
                       f"{shown}, replace it with --force, or choose another --out")
    ckpt.check_unlocked(out)
    staging = staging_dir(out)
    if staging.exists():
        if not staging.is_dir() or (any(staging.iterdir())
                                    and not (staging / ckpt.SPEC_FILE).is_file()):
            raise RunError(f"{str(staging)!r} is in the way (a --force run trains there first); "
                           "move it away")
        ckpt.check_unlocked(staging)
    return out


def check_report_dir(out: Path, force: bool) -> None:
    """The folder of a command that writes results (not a run): new, empty, or `force`.

    Such commands write their files only at the end, each atomically, so an earlier result
    stays whole until a new one has been computed.
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(f"--out {str(out)!r} is not empty; pass --force to overwrite its results "
                       "or choose another --out")


def check_sizes(model, config: TrainConfig, n_train: int) -> None:
    """Refuse sizes that could only end in an out-of-memory crash."""
    v, t, e, h = model.vocab_size, model.block_size, model.n_embd, model.n_hidden
    n_params = v * e + t * e * h + 3 * h + h * v + v  # an upper bound over the stages
    n_params += getattr(model, "depth", 0) * (h * h + 3 * h)  # DeepMLP's hidden blocks
    if n_params > MAX_PARAMS:
        raise ConfigError(f"the model would have about {n_params:,} parameters (at most "
                          f"{MAX_PARAMS:,}); use a smaller --n-hidden, --n-embd or --block-size")
    if config.batch_size > n_train:
        raise ConfigError(f"batch size {config.batch_size:,} is larger than the training set "
                          f"({n_train:,} examples); use a smaller --batch-size")


def default_out(stage: str, seed: int, torch_stream: bool = False) -> Path:
    return Path(f"runs/{stage}-{'torch' if torch_stream else f's{seed}'}")


def plan_new_run(stage: str = "batchnorm", *, seed: int = 0, config: TrainConfig | None = None,
                 data: str | Path = DEFAULT_DATA, out: str | Path | None = None,
                 force: bool = False, torch_stream: bool = False, block_size: int = 3,
                 n_embd: int = 10, n_hidden: int | None = None) -> RunPlan:
    """Validate a new run of `stage` and build its initial state; writes nothing.

    n_hidden None is the stage's width (200 shallow, 100 deep). torch_stream: start from the
    PyTorch lecture's initial tensors and take its minibatches (needs torch; seed unused).
    """
    import jax

    from jaxmlp.stages import SCHEDULES, check_stage, make_model
    from jaxmlp.train import create_train_state

    check_stage(stage)
    check_seed(seed)
    config = config or TrainConfig(schedule=SCHEDULES[stage])
    if config.chunk < 1:
        raise ConfigError(f"--checkpoint-every must be a positive number of steps, got "
                          f"{config.chunk}")
    # The sizes, before the (slower) data: a module is only a description until init.
    sized = make_model(stage, 1, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden)
    config.validate(batchnorm=sized.batchnorm)
    if torch_stream:
        from jaxmlp.torch_bridge import check_model, import_torch

        check_model(sized)  # a model the lecture's code can express
        import_torch()  # fail before anything else when torch is missing
    out = Path(out) if out is not None else default_out(stage, seed, torch_stream)
    replaces = check_out_dir(out, force)
    dataset = load_dataset(data, block_size=block_size)
    model = make_model(stage, dataset.vocab.size, block_size=block_size, n_embd=n_embd,
                       n_hidden=n_hidden)
    check_sizes(model, config, len(dataset.train.Y))
    spec = ckpt.RunSpec(stage, seed, model, config, dataset.vocab, str(data),
                        torch_stream=torch_stream)
    if torch_stream:  # the PyTorch lecture's initial tensors and minibatches
        from jaxmlp.torch_bridge import lecture_stream

        state, batch_ix = lecture_stream(model, config, len(dataset.train.X))
    else:
        state, batch_ix = create_train_state(jax.random.key(seed), model, config), None
    return RunPlan(spec=spec, data=dataset, state=state, losses=np.zeros(0, np.float32),
                   data_sha256=ckpt.file_sha256(data), out=out,
                   workdir=out if replaces is None else staging_dir(out),
                   replaces="" if replaces is None else str(replaces.absolute()),
                   batch_ix=batch_ix)


def plan_resumed_run(run: str | Path, *, data: str | Path | None = None,
                     checkpoint_every: int | None = None) -> RunPlan:
    """Validate a resume of the unfinished run in `run` and load its checkpoint; writes nothing.

    The saved spec decides every setting; `data` may point at the same names file moved
    elsewhere (its SHA-256 must match) and `checkpoint_every` changes only when it saves.
    """
    run = Path(run)
    ck = ckpt.load_checkpoint(run)
    spec = ck.spec
    if ck.step >= spec.train.steps and ckpt.is_finished(run):
        hint = ""
        if staging_dir(run).is_dir():
            hint = f"; an interrupted --force run is in {str(staging_dir(run))!r}: resume that"
        raise RunError(f"run {str(run)!r} already finished ({spec.train.steps:,} steps), nothing "
                       f"to resume; use `jaxmlp eval --run {run}`{hint}")
    if ck.losses.size != ck.step:
        raise RunError(f"checkpoint of {str(run)!r} has no loss history, so it cannot be "
                       "resumed exactly; train the run again with --force")
    if checkpoint_every is not None:
        if checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be a positive number of steps, got "
                              f"{checkpoint_every}")
        spec = dataclasses.replace(spec, train=dataclasses.replace(
            spec.train, chunk=checkpoint_every))
    data_path = Path(spec.data) if data is None else Path(data)
    dataset = load_dataset(data_path, block_size=spec.model.block_size, vocab=spec.vocab)
    sha = ckpt.file_sha256(data_path)
    if ck.data_sha256 and sha != ck.data_sha256:
        raise DataError(f"data file {str(data_path)!r} is not the one run {str(run)!r} was "
                        "trained on (its SHA-256 differs); pass --data with the original file")
    ckpt.check_unlocked(run)
    spec = dataclasses.replace(spec, data=str(data_path))
    batch_ix = None
    if spec.torch_stream:  # the whole stream again: fit indexes it by absolute step
        from jaxmlp.torch_bridge import lecture_stream

        batch_ix = lecture_stream(spec.model, spec.train, len(dataset.train.X))[1]
    return RunPlan(spec=spec, data=dataset, state=ck.state, losses=ck.losses, data_sha256=sha,
                   out=Path(ck.replaces) if ck.replaces else run, workdir=run,
                   replaces=ck.replaces, batch_ix=batch_ix, resumed=True)


def train_run(plan: RunPlan, *, progress: bool = True,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train `plan` to its last step, checkpointing as it goes; returns the metrics it wrote.

    Raises DivergenceError (the last good checkpoint kept), RunError when a file cannot be
    written, and Interrupted on Ctrl-C (the last checkpoint kept, resumable).
    """
    import jax

    from jaxmlp.evaluate import calibrate, split_losses
    from jaxmlp.plot import plot_loss
    from jaxmlp.train import _smaller_lr_flag, fit

    spec, data, prior, workdir = plan.spec, plan.data, plan.losses, plan.workdir
    model, config = spec.model, spec.train
    start = int(plan.state.step)
    saved_step = start

    def save(state, losses):
        nonlocal saved_step
        ckpt.save_checkpoint(workdir, spec, state, losses, plan.data_sha256, plan.replaces)
        saved_step = int(state.step)

    if not plan.resumed:
        if plan.replaces and workdir.exists():  # an earlier --force run that did not finish
            with ckpt.run_lock(workdir):
                shutil.rmtree(workdir)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {str(workdir)!r} ({e.strerror}); "
                           "choose another --out") from None
    with ckpt.run_lock(workdir):
        try:
            ckpt.write_json(workdir / ckpt.SPEC_FILE, spec.to_json())
        except OSError as e:
            raise RunError(f"cannot write in {str(workdir)!r} ({e.strerror}); choose another "
                           "--out or free space") from None
        if not plan.resumed:
            save(plan.state, prior)  # step 0: the directory is a resumable run from the start

        n_params = sum(int(x.size) for x in jax.tree.leaves(plan.state.params))
        where = (f"resuming {workdir} at step {start:,}" if plan.resumed else
                 "the lecture torch stream" if spec.torch_stream else f"seed {spec.seed}")
        if log:
            log(f"stage {spec.stage}: {n_params:,} parameters, {config.steps:,} steps, {where}, "
                f"on {jax.devices()[0].platform}")
        try:
            result = fit(plan.state, *data.train, model, config, batch_ix=plan.batch_ix,
                         progress=progress, log=log,
                         on_chunk=lambda s, losses: save(s, np.concatenate([prior, losses])))
        except DivergenceError as e:
            raise DivergenceError(f"{e} (the last good checkpoint, step {saved_step:,}, is kept "
                                  f"in {workdir})", step=e.step) from None
        except KeyboardInterrupt:
            raise Interrupted(f"the last checkpoint (step {saved_step:,}) is in {workdir}: "
                              f"continue with `jaxmlp train --resume {workdir}`") from None
        losses = np.concatenate([prior, result.losses])
        variables = result.state.variables
        split = split_losses(model, variables, data)
        bad = [k for k, v in split.items() if not np.isfinite(v)]
        if bad:  # finite but enormous weights: the training loss hid the divergence
            raise DivergenceError(
                f"training diverged: the final {bad[0]} loss is {split[bad[0]]}; lower the "
                f"learning rate (e.g. {_smaller_lr_flag(config)}) and train again with --force")
        steps_run = config.steps - start
        metrics = {
            "stage": spec.stage, "seed": spec.seed, "steps": config.steps, "params": n_params,
            "torch_stream": spec.torch_stream, **split,
            "seconds": result.seconds, "compile_seconds": result.compile_seconds,
            "us_per_step": ((result.seconds - result.compile_seconds) / steps_run * 1e6
                            if steps_run else None),
            "step_losses": {str(i): float(losses[i]) for i in range(0, config.steps, 10_000)},
            "backend": jax.devices()[0].platform, "jax": jax.__version__,
            "machine": platform.machine(), "date": datetime.date.today().isoformat(),
        }
        if start:
            metrics["resumed_from_step"] = start
        if model.batchnorm:
            metrics["calibrated"] = split_losses(
                model, calibrate(variables, data.train.X, model=model), data)
        try:
            ckpt.write_atomic(workdir / ckpt.LOSSES_FILE, _npy_bytes(losses))
            plot_loss(losses, workdir / ckpt.PLOT_FILE, title=f"{spec.stage}, seed {spec.seed}")
            ckpt.write_json(workdir / ckpt.METRICS_FILE, metrics)  # last: marks it finished
        except OSError as e:
            raise RunError(f"cannot write the results in {str(workdir)!r} ({e.strerror or e}); "
                           f"the final checkpoint is saved: free space, then `jaxmlp train "
                           f"--resume {workdir}`") from None
    if plan.replaces:
        ckpt.replace_dir(workdir, plan.out)
    return metrics


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
