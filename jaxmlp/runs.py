"""Training in a run directory: plan a new or resumed run, train it with checkpoints, finish it.

A run directory holds `run.json` (what made it), `checkpoint.msgpack` (the whole training
state, rewritten atomically every `config.chunk` steps), and once finished `losses.npy`,
`loss.png` and `metrics.json` (written last: its presence marks the run finished). Their
formats: `jaxmlp.checkpoint`; which files are jaxmlp's, and how a run replaces another:
`jaxmlp.rundir`.

    plan = plan_new_run("batchnorm", seed=0, out="runs/bn", config=TrainConfig())
    metrics = train_run(plan)             # or plan_resumed_run("runs/bn") after a crash

Planning validates everything and writes nothing, so a bad option leaves every file as it
was. `train_run` locks the directory, then decides again what it holds (another process may
have written it since), and only then writes. With `force` a new run trains in `OUT.partial`
and replaces the run in OUT once it has finished, if OUT still holds that run, byte for byte:
a crash, a divergence or Ctrl-C in the new run leaves the earlier run whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmlp import checkpoint as ckpt
from jaxmlp import optim, rundir
from jaxmlp.data import DEFAULT_DATA, Dataset, load_dataset
from jaxmlp.errors import ConfigError, DataError, DivergenceError, RunError
from jaxmlp.limits import check_seed
from jaxmlp.protocol import has_batch_stats
from jaxmlp.train import TrainConfig, TrainState

if TYPE_CHECKING:
    from jaxmlp.loss_plotter import LossPlotter


@dataclasses.dataclass
class RunPlan:
    """A validated run, ready for `train_run`: nothing of it is on disk yet.

    state/losses: where training starts (step 0, or a checkpoint with its (step,) losses).
    batch_ix: the PyTorch lecture's minibatches ((steps, B) int32) for a torch-stream run.
    out: the run directory asked for; workdir: where it trains, `out` or, when it replaces
    an earlier run, `out.partial` (then `replaces` is that run's real path and
    `replaces_fingerprint` its `fingerprint`).
    """

    spec: ckpt.RunSpec
    data: Dataset
    state: TrainState
    losses: np.ndarray
    out: Path
    workdir: Path
    replaces: str = ""
    replaces_fingerprint: str = ""
    batch_ix: np.ndarray | None = None
    resumed: bool = False
    checkpoint_stamp: tuple | None = None  # (size, mtime) of the checkpoint resumed from
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `train_run`; the message says where the last checkpoint is."""


class Clock:
    """Seconds per phase of a command, for `jaxmlp train --profile` (docs/speed.md)."""

    def __init__(self, laps: dict[str, float] | None = None):
        self.laps = {} if laps is None else laps
        self._t = time.perf_counter()

    def lap(self, name: str, wait=None) -> None:
        if wait is not None:  # JAX dispatches asynchronously: count the work, not the call
            import jax

            jax.block_until_ready(wait)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now

    def restart(self) -> None:
        self._t = time.perf_counter()


def default_out(stage: str, seed: int, torch_stream: bool = False) -> Path:
    return Path(f"runs/{stage}-{'torch' if torch_stream else f's{seed}'}")


# ------------------------------------------------------------------------------------ planning


def start_state(model, config: TrainConfig, *, seed: int = 0, torch_stream: bool = False,
                n_train: int) -> tuple[TrainState, np.ndarray | None]:
    """A run's first state, and its minibatch indices when they are not drawn on the device:
    JAX's init and sampler from `seed`, or the PyTorch lecture's tensors and stream."""
    if torch_stream:
        from jaxmlp.torch_bridge import lecture_stream

        return lecture_stream(model, config, n_train)
    import jax

    from jaxmlp.train import create_train_state

    return create_train_state(jax.random.key(seed), model, config), None


def plan_new_run(stage: str | Any = "batchnorm", *, seed: int = 0,
                 config: TrainConfig | None = None, data: str | Path = DEFAULT_DATA,
                 out: str | Path | None = None, force: bool = False, torch_stream: bool = False,
                 block_size: int | None = None, n_embd: int | None = None,
                 n_hidden: int | None = None, **model_fields) -> RunPlan:
    """Validate a new run of `stage` and build its initial state; writes nothing.

    stage: a stage name, or a flax.linen Module of one's own (the model protocol:
    jaxmlp.protocol; its sizes are its own, so block_size, n_embd, n_hidden and model_fields
    do not apply). block_size None is 3, n_embd None 10, n_hidden None the stage's width (200
    shallow, 100 deep); `model_fields` override the stage's (e.g. bn_epsilon, norm, depth).
    config: default the stage's schedule with SGD; its optimizer may be any optax
    transformation. torch_stream: start from the PyTorch lecture's initial tensors and take its
    minibatches (needs torch; seed unused).
    """
    from jaxmlp import protocol
    from jaxmlp.stages import get_stage, make_model

    check_seed(seed)
    if isinstance(stage, str):
        get_stage(stage)
        config = config or TrainConfig(schedule=get_stage(stage).schedule)
        sizes = dict(block_size=3 if block_size is None else block_size,
                     n_embd=10 if n_embd is None else n_embd, n_hidden=n_hidden, **model_fields)
        # The sizes, before the (slower) data: a module is only a description until init.
        sized = make_model(stage, 1, **sizes)
        label = stage
    else:
        given = {k: v for k, v in dict(block_size=block_size, n_embd=n_embd, n_hidden=n_hidden,
                                        **model_fields).items() if v is not None}
        if given:
            raise ConfigError(f"{next(iter(given))} is a field of the stages' models; a module "
                              "of one's own carries its own sizes (set them on the module)")
        sized = protocol.check_model(stage)
        protocol.model_to_json(sized)  # run.json must be able to name it
        config, label = config or TrainConfig(), type(sized).__name__
    config.validate(batchnorm=protocol.has_batch_stats(sized))
    if torch_stream:
        from jaxmlp.torch_bridge import check_model, import_torch

        check_model(sized)  # a model the lecture's code can express
        import_torch()  # fail before anything else when torch is missing
    out = Path(out) if out is not None else default_out(label, seed, torch_stream)
    holding = rundir.check_out_dir(out, force)
    clock = Clock()
    dataset = load_dataset(data, block_size=sized.block_size)
    clock.lap("data")
    if isinstance(stage, str):
        model = make_model(stage, dataset.vocab.size, **sizes)
    else:
        model = protocol.check_model(stage, vocab_size=dataset.vocab.size)
    config.check_fits(model, len(dataset.train.Y), _n_examples(dataset), stream=torch_stream)
    spec = ckpt.RunSpec(label, seed, model, config, dataset.vocab, os.path.abspath(data),
                        torch_stream=torch_stream)
    spec.to_json()  # a custom optimizer must initialise on the model's parameters
    state, batch_ix = start_state(model, config, seed=seed, torch_stream=torch_stream,
                                  n_train=len(dataset.train.X))
    clock.lap("init", wait=state)
    replacing, real = holding.kind == "run", rundir.real_path(out)
    return RunPlan(spec=spec, data=dataset, state=state, losses=np.zeros(0, np.float32),
                   out=out, workdir=rundir.staging_dir(out) if replacing else real,
                   replaces=str(real) if replacing else "",
                   replaces_fingerprint=holding.fingerprint, batch_ix=batch_ix,
                   timings=clock.laps)


def _n_examples(data: Dataset) -> int:
    return sum(len(data.split(s).Y) for s in ("train", "val", "test"))


def plan_resumed_run(run: str | Path, *, data: str | Path | None = None,
                     checkpoint_every: int | None = None, optimizer=None) -> RunPlan:
    """Validate a resume of the unfinished run in `run` and load its checkpoint; writes nothing.

    The saved spec decides every setting; `data` may point at the same names file moved
    elsewhere (its SHA-256 must match) and `checkpoint_every` changes only when it saves. A run
    stopped before its first checkpoint starts again from step 0 (its spec determines it).
    optimizer: the run's custom optimizer (an optax transformation), given again: run.json
    records only its state's structure, which must match (RunError otherwise, or when a run
    that needs it is resumed without it).
    """
    run = rundir.real_path(run)
    spec = optim.with_optimizer(ckpt.load_spec(run), optimizer, run)
    unstarted = not rundir.foreign_entries(run) and not any(
        (run / name).exists() for name in (ckpt.CKPT_FILE, ckpt.METRICS_FILE, ckpt.LOSSES_FILE))
    ck = None if unstarted else ckpt.load_checkpoint(run, optimizer)
    if ck is not None and ck.step >= spec.train.steps and ckpt.is_finished(run):
        staging, hint = rundir.staging_dir(run), ""
        if staging.is_dir():
            hint = f"; an interrupted --force run is in {str(staging)!r}: resume that"
        if not ck.replaces:
            raise RunError(f"run {str(run)!r} already finished ({spec.train.steps:,} steps), "
                           f"nothing to resume; use `jaxmlp eval --run {run}`{hint}")
    if ck is not None and ck.losses.size != ck.step:
        raise RunError(f"checkpoint of {str(run)!r} has no loss history, so it cannot be "
                       "resumed exactly; train the run again with --force")
    if checkpoint_every is not None:
        spec = dataclasses.replace(spec, train=dataclasses.replace(
            spec.train, chunk=checkpoint_every))
        spec.train.validate(batchnorm=has_batch_stats(spec.model))
    data_path = Path(spec.data) if data is None else Path(data)
    dataset = load_dataset(data_path, block_size=spec.model.block_size, vocab=spec.vocab)
    recorded = ck.data_sha256 if ck is not None else ""
    if recorded and dataset.sha256 != recorded:
        raise DataError(f"data file {str(data_path)!r} is not the one run {str(run)!r} was "
                        "trained on (its SHA-256 differs); pass --data with the original file")
    spec = dataclasses.replace(spec, data=os.path.abspath(data_path))
    if ck is None:  # killed between run.json and the first checkpoint: start again
        state, batch_ix = start_state(spec.model, spec.train, seed=spec.seed,
                                      torch_stream=spec.torch_stream,
                                      n_train=len(dataset.train.X))
        losses, replaces, replaced_fp, stamp = np.zeros(0, np.float32), "", "", None
    else:
        state, losses, replaces, replaced_fp = ck.state, ck.losses, ck.replaces, \
            ck.replaces_fingerprint
        batch_ix = None
        if spec.torch_stream:  # the whole stream again: fit indexes it by absolute step
            from jaxmlp.torch_bridge import lecture_stream

            batch_ix = lecture_stream(spec.model, spec.train, len(dataset.train.X))[1]
        stamp = _stamp(run / ckpt.CKPT_FILE)
    return RunPlan(spec=spec, data=dataset, state=state, losses=losses,
                   out=Path(replaces) if replaces else run, workdir=run, replaces=replaces,
                   replaces_fingerprint=replaced_fp, batch_ix=batch_ix, resumed=ck is not None,
                   checkpoint_stamp=stamp)


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


# ------------------------------------------------------------------------------------ training


@contextlib.contextmanager
def _claimed(plan: RunPlan):
    """Create and lock the plan's working directory, then check again, under the lock, that
    it holds what the plan was made for: another process may have written it meanwhile."""
    workdir = plan.workdir
    try:
        workdir.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise RunError(f"cannot create run directory {str(workdir)!r} ({e.strerror}); "
                       "choose another --out") from None
    with rundir.run_lock(workdir):  # a directory in use is left alone, even one we created
        try:
            _check_claim(plan, workdir)
            yield workdir
        except BaseException:
            if created and not os.listdir(workdir):  # nothing could be written: leave no trace
                os.rmdir(workdir)
            raise


def _check_claim(plan: RunPlan, workdir: Path) -> None:
    if plan.resumed:
        if _stamp(workdir / ckpt.CKPT_FILE) != plan.checkpoint_stamp:
            raise RunError(f"the checkpoint in {str(workdir)!r} changed after it was read "
                           "(another process resumed it?); run the command again")
    elif plan.replaces:
        with rundir.run_lock(plan.replaces):
            if rundir.check_out_dir(plan.out, True) != ("run", plan.replaces_fingerprint):
                raise RunError(f"--out {str(plan.out)!r} changed while the run was being "
                               "prepared; run the command again")
        rundir.remove_run(workdir, keep_dir=True)  # leftovers of an earlier --force run
    else:
        rundir.check_out_dir(workdir, False)  # raises unless empty or unstarted
        rundir.remove_run(workdir, keep_dir=True)  # an unstarted run's files, if any


def train_run(plan: RunPlan, *, progress: bool = True,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train `plan` to its last step, checkpointing as it goes; returns the metrics it wrote.

    Raises DivergenceError (the last good checkpoint kept), RunError when a file cannot be
    written, and Interrupted on Ctrl-C (the last checkpoint kept, resumable).
    """
    import jax

    from jaxmlp.loss_plotter import LossPlotter
    from jaxmlp.train import fit

    spec, data, prior = plan.spec, plan.data, plan.losses
    model, config = spec.model, spec.train
    start = int(plan.state.step)
    saved_step = None
    if plan.resumed and plan.replaces and ckpt.is_finished(plan.workdir):
        with _claimed(plan):  # finished, but stopped before replacing the earlier run
            metrics = json.loads(ckpt.read_file(plan.workdir / ckpt.METRICS_FILE))
        rundir.replace_run(plan.workdir, Path(plan.replaces), plan.replaces_fingerprint)
        return metrics

    clock = Clock(plan.timings)
    with _claimed(plan) as workdir, contextlib.closing(LossPlotter()) as plotter:
        def save(state, losses):
            nonlocal saved_step
            ckpt.save_checkpoint(workdir, spec, state, losses, data.sha256, plan.replaces,
                                 plan.replaces_fingerprint)
            saved_step = int(state.step)

        def kept() -> str:
            return ("no checkpoint was written" if saved_step is None else
                    f"the last good checkpoint, step {saved_step:,}, is kept in {workdir}")

        try:
            ckpt.write_json(workdir / ckpt.SPEC_FILE, spec.to_json())
        except OSError as e:
            raise RunError(f"cannot write in {str(workdir)!r} ({e.strerror}); choose another "
                           "--out or free space") from None
        if plan.resumed:
            saved_step = start
        else:  # step 0: the directory is a resumable run from the start
            save(plan.state, prior)
        n_params = sum(int(x.size) for x in jax.tree.leaves(plan.state.params))
        where = (f"resuming {workdir} at step {start:,}" if start or plan.resumed else
                 "the lecture torch stream" if spec.torch_stream else f"seed {spec.seed}")
        if log:
            log(f"stage {spec.stage}: {n_params:,} parameters, {config.steps:,} steps, {where}, "
                f"on {jax.devices()[0].platform}")
        try:
            result = fit(plan.state, *data.train, model, config, batch_ix=plan.batch_ix,
                         progress=progress, log=log,
                         on_chunk=lambda s, losses: save(s, np.concatenate([prior, losses])))
        except DivergenceError as e:
            raise DivergenceError(f"{e} ({kept()})", step=e.step) from None
        except KeyboardInterrupt:
            raise Interrupted(f"the last checkpoint (step {saved_step or 0:,}) is in {workdir}: "
                              f"continue with `jaxmlp train --resume {workdir}`") from None
        plan.timings["compile"] = result.compile_seconds
        plan.timings["train"] = result.seconds - result.compile_seconds  # and checkpoints
        clock.restart()
        losses = np.concatenate([prior, result.losses])
        metrics = _finish(plan, workdir, result, losses, n_params, start, clock, plotter)
    if plan.replaces:
        rundir.replace_run(workdir, Path(plan.replaces), plan.replaces_fingerprint)
    return metrics


def _finish(plan: RunPlan, workdir: Path, result, losses: np.ndarray, n_params: int,
            start: int, clock: Clock, plotter: LossPlotter) -> dict[str, Any]:
    """Evaluate the trained run and write its results; metrics.json last."""
    spec = plan.spec
    plotter.request(losses, f"{spec.stage}, seed {spec.seed}")  # drawn during the evaluation
    metrics = _evaluate(plan, result, losses, n_params, start)
    clock.lap("evaluate")
    try:
        ckpt.write_atomic(workdir / ckpt.LOSSES_FILE, _npy_bytes(losses))
        ckpt.write_atomic(workdir / ckpt.PLOT_FILE, plotter.png())
        ckpt.write_json(workdir / ckpt.METRICS_FILE, metrics)  # last: marks it finished
    except OSError as e:
        raise RunError(f"cannot write the results in {str(workdir)!r} ({e.strerror or e}); "
                       f"the final checkpoint is saved: free space, then `jaxmlp train "
                       f"--resume {workdir}`") from None
    clock.lap("write")
    return metrics


def _evaluate(plan: RunPlan, result, losses: np.ndarray, n_params: int,
              start: int) -> dict[str, Any]:
    """The metrics of a trained run: split losses (calibrated ones too, for batch norm),
    timings, the loss every 10,000 steps, and where it was measured."""
    import jax

    from jaxmlp.evaluate import final_losses
    from jaxmlp.train import lower_lr_hint

    spec = plan.spec
    model, config = spec.model, spec.train
    split = final_losses(model, result.state.variables, plan.data)
    calibrated = split.pop("calibrated", False)
    bad = [k for k, v in split.items() if not np.isfinite(v)]
    if bad:  # finite but enormous weights: the training loss hid the divergence
        raise DivergenceError(
            f"training diverged: the final {bad[0]} loss is {split[bad[0]]}; lower the "
            f"learning rate (e.g. {lower_lr_hint(config)}) and train again with --force")
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
    if calibrated is not False:  # batch norm: None when too large to calibrate at once
        metrics["calibrated"] = calibrated
    return metrics


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
