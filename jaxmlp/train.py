"""Training as pure functions over an explicit `TrainState`.

    TrainConfig                      a run's hyperparameters, as plain (hashable) data; its
                                     optimizer: "sgd", "adam" or any optax transformation
                                     (Schedule, make_optimizer, ...: jaxmlp.optim)
    create_train_state               key -> params, batch_stats, opt_state, step, key
    sample_batch / sample_batches    the minibatch indices of a step / of a chunk of steps
    compute_grads / apply_grads      the two halves of a step (diagnostics reuse them)
    train_step                       one minibatch update
    run_steps                        `lax.scan` over many steps: the fused, device-resident loop
    train_chunk                      `run_steps` compiled (the state buffers are donated)
    fit                              host loop over chunks: progress bar, the lecture's log lines

`run_steps` is the one code path for a single run and for a `jax.vmap`ped sweep over seeds,
initial scales or learning rates: vmap it over a stacked `TrainState` (jaxmlp.sweep).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from jaxmlp import limits, optim
from jaxmlp.errors import ConfigError, DivergenceError
from jaxmlp.optim import (  # noqa: F401 (part of this module's API)
    Schedule,
    make_optimizer,
    make_schedule,
    scale_updates,
)
from jaxmlp.program_cache import Compiled, compiler_options, program_key  # noqa: F401 (API)
from jaxmlp.protocol import has_batch_stats


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run (hashable: it is a static argument of the compiled loop).

    optimizer: "sgd" (the lecture's) or "adam" on `schedule`, or any optax
    GradientTransformation, which carries its own schedule (`schedule` is then unused).
    schedule: the stepped `Schedule`, a number (a constant rate) or any optax schedule.
    A transformation or schedule is hashed by identity: build it once and reuse it, so that
    the compiled loop is reused too.
    chunk: steps per compiled call. The host sees the state only between calls (to log,
    check for divergence and, in a run directory, checkpoint: `jaxmlp train
    --checkpoint-every`), so it trades one host round trip against how much work a crash loses.
    """

    steps: int = 200_000
    batch_size: int = 32
    schedule: Schedule | Callable | float = field(default_factory=Schedule)
    optimizer: str | optax.GradientTransformation | optim.RecordedOptimizer = "sgd"
    chunk: int = 10_000

    def __post_init__(self):
        if isinstance(self.schedule, (int, float)) and not isinstance(self.schedule, bool):
            object.__setattr__(self, "schedule", Schedule((float(self.schedule),), ()))

    def validate(self, batchnorm: bool = False) -> TrainConfig:
        if not isinstance(self.steps, int) or not 1 <= self.steps <= limits.MAX_STEPS:
            raise ConfigError(f"steps must be a positive integer up to {limits.MAX_STEPS:,} (the "
                              f"step counter is int32), got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if batchnorm and self.batch_size < 2:
            raise ConfigError("batch size 1 leaves batch norm's unbiased std undefined; "
                              "use --batch-size 2 or more")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ConfigError(f"--checkpoint-every must be a positive number of steps (the steps "
                              f"per compiled call, `chunk`), got {self.chunk!r}")
        optim.check_optimizer(self)
        return self

    def check_fits(self, model: nn.Module, n_train: int, n_examples: int | None = None,
                   stream: bool = False) -> TrainConfig:
        """`validate`, then refuse what the data or the device's memory cannot hold."""
        self.validate(batchnorm=has_batch_stats(model))
        if self.batch_size > n_train:
            raise ConfigError(f"batch size {self.batch_size:,} is larger than the training set "
                              f"({n_train:,} examples); use a smaller --batch-size")
        n_params = limits.count_params(model)
        if n_params > limits.MAX_PARAMS:
            raise ConfigError(f"the model would have about {n_params:,} parameters (at most "
                              f"{limits.MAX_PARAMS:,}); use a smaller --n-hidden, --n-embd or "
                              "--block-size")
        limits.check_memory(limits.memory_needed(
            model, batch_size=self.batch_size, chunk=self.chunk, n_examples=n_examples or n_train,
            optimizer_slots=optim.optimizer_slots(self, limits.param_shapes(model)),
            stream_steps=self.steps if stream else 0))
        return self


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; all leaves are arrays (vmap/scan/save-able)."""

    step: jax.Array  # () int32: steps taken so far
    params: Any
    batch_stats: Any  # running batch-norm statistics ({} without batch norm)
    opt_state: optax.OptState
    key: jax.Array  # the run's key; step i draws its minibatch from fold_in(key, i)

    @property
    def variables(self) -> dict:
        """The Flax variables for `model.apply`: params and batch_stats."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(key: jax.Array, model: nn.Module, config: TrainConfig) -> TrainState:
    """Draw the initial variables from `key` and start the optimizer.

    One compiled program (a Flax `init` run op by op compiles dozens of small ones), equal bit
    for bit to the op-by-op draws (`init.scaled_draw`).
    """
    try:
        hash(model)
    except TypeError:  # fields traced by an enclosing vmap (a sweep over init scales): that
        return _init_state(key, model, config)  # transformation compiles it already
    if isinstance(key, jax.core.Tracer):  # inside the caller's jit or vmap
        return _create_train_state(key, model=model, config=config)
    program = _PROGRAMS(program_key("init", model, config, arrays=key),
                        lambda: _create_train_state.lower(key, model=model, config=config))
    return program(key)


def _init_state(key: jax.Array, model: nn.Module, config: TrainConfig) -> TrainState:
    init_key, data_key = jax.random.split(key)
    variables = model.init(init_key, limits.example_tokens(model, 2), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=make_optimizer(config).init(params),
        key=data_key,
    )


_create_train_state = jax.jit(_init_state, static_argnames=("model", "config"))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of (B, V) logits against (B,) int targets: F.cross_entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def loss_fn(params, batch_stats, model: nn.Module, X: jax.Array, Y: jax.Array):
    """Training-mode loss of a minibatch and the batch_stats it produces."""
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, X, train=True,
                                  mutable=["batch_stats"])
    return cross_entropy(logits, Y), updates.get("batch_stats", {})


def sample_batch(key: jax.Array, step: jax.Array, n: int, batch_size: int) -> jax.Array:
    """Minibatch indices of step `step`: uniform with replacement, like torch.randint."""
    return jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n)


def sample_batches(key: jax.Array, start: jax.Array, num_steps: int, n: int,
                   batch_size: int) -> jax.Array:
    """The minibatch indices of steps start .. start + num_steps - 1, (num_steps, batch_size).

    Row i is `sample_batch(key, start + i, ...)` bit for bit (a vmap of the same draw), so a
    run's minibatches depend on (key, step) only, never on how its steps are chunked or
    resumed. Drawn for a whole chunk at once, which is cheaper than a draw inside every step
    (docs/speed.md).
    """
    steps = start + jnp.arange(num_steps, dtype=jnp.int32)
    return jax.vmap(sample_batch, in_axes=(None, 0, None, None))(key, steps, n, batch_size)


def compute_grads(state: TrainState, X: jax.Array, Y: jax.Array, model: nn.Module):
    """Minibatch loss, the batch_stats it produces, and d(loss)/d(params)."""
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, model, X, Y)
    return loss, batch_stats, grads


def apply_grads(state: TrainState, grads, batch_stats, tx: optax.GradientTransformation):
    """The optimizer update; returns the new state and the parameter updates it applied."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), updates


def train_step(state: TrainState, X: jax.Array, Y: jax.Array, model: nn.Module,
               tx: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
    """One SGD step on a minibatch X (B, T), Y (B,); returns the new state and the loss."""
    loss, batch_stats, grads = compute_grads(state, X, Y, model)
    state, _ = apply_grads(state, grads, batch_stats, tx)
    return state, loss


def run_steps(state: TrainState, X: jax.Array, Y: jax.Array, batch_ix: jax.Array | None = None,
              *, model: nn.Module, config: TrainConfig, num_steps: int,
              lr_scale: jax.Array | None = None):
    """`num_steps` training steps fused into one `lax.scan`; returns (state, losses (num_steps,)).

    X (N, T), Y (N,) is the training split, resident on the device. Minibatches are drawn on
    the device from the state's key, or taken from `batch_ix` (num_steps, B) when given (e.g.
    the PyTorch lecture's index stream). `lr_scale` () multiplies the learning rate (see
    `scale_updates`); vmap over it to sweep the learning rate.
    """
    tx = make_optimizer(config)
    if lr_scale is not None:
        tx = scale_updates(tx, jnp.asarray(lr_scale))
    B = config.batch_size

    def body(state, ix):
        if ix is None:  # a large batch: drawn and gathered step by step (the same indices)
            ix = sample_batch(state.key, state.step, X.shape[0], B)
        return train_step(state, X[ix], Y[ix], model, tx)

    if num_steps * B * (X.shape[1] + 1) * 4 > limits.GATHER_BYTES:
        if batch_ix is None:
            return jax.lax.scan(lambda s, _: body(s, None), state, length=num_steps)
        return jax.lax.scan(body, state, batch_ix)
    if batch_ix is None:
        batch_ix = sample_batches(state.key, state.step, num_steps, X.shape[0], B)
    # The chunk's examples in one gather, (num_steps, B, T) and (num_steps, B), streamed through
    # the scan: two small gathers inside every step cost more than the whole chunk's at once.
    Xb, Yb = X[batch_ix], Y[batch_ix]
    return jax.lax.scan(lambda s, xy: train_step(s, *xy, model, tx), state, (Xb, Yb))


train_chunk = jax.jit(run_steps, static_argnames=("model", "config", "num_steps"),
                      donate_argnames=("state",))


# The training programs of `fit`, kept for the process like jit's own cache.
_PROGRAMS = Compiled()


def chunks(start: int, steps: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(first step, number of steps) of each compiled call from `start` to `steps`; calls end
    on the multiples of `chunk`, so a resumed run stops where an uninterrupted one does."""
    s = start
    while s < steps:
        n = min(chunk - s % chunk, steps - s)
        yield s, n
        s += n


def progress_bar(config: TrainConfig, start: int, enabled: bool):
    """A tqdm bar from `start` to `config.steps`, or one that does nothing (not imported)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, unit="step", mininterval=0.5, leave=False)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FitResult:
    state: TrainState
    losses: np.ndarray  # (steps,) float32 minibatch loss of every step
    seconds: float  # wall time of the loop, compilation included
    compile_seconds: float


def fit(state: TrainState, X, Y, model: nn.Module, config: TrainConfig, *,
        batch_ix: np.ndarray | None = None, log_every: int = 10_000,
        log: Callable[[str], None] | None = print, progress: bool = True,
        on_chunk: Callable[[TrainState, np.ndarray], None] | None = None) -> FitResult:
    """Train from `state` to `config.steps` in compiled chunks (the host only logs).

    Prints the lecture's `      0/ 200000: 3.3239` line every `log_every` steps and raises
    DivergenceError (naming the step and the likely cause) if a loss, or after a chunk any
    parameter, optimizer or batch-norm statistic, stops being finite.

    Chunks end at the multiples of `config.chunk` (and at `config.steps`), whatever step
    `state` starts from, so a resumed run checkpoints at the same steps as an uninterrupted one.
    The minibatch of step i depends only on (key, i), so chunking never changes the numbers.

    on_chunk(state, losses): called after every chunk that is entirely finite, with the new
        state and this call's minibatch losses so far ((state.step - start,) float32); this is
        where checkpoints are written. A chunk that diverges never reaches it, so the last
        state it saw is the last good one. Its buffers are donated to the next chunk: copy
        (e.g. serialise) what you keep before returning. (`state` itself is copied first, so
        the caller's stays usable; `train_chunk` donates what it is given.)
    """
    config.validate(batchnorm=has_batch_stats(model))
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    start = int(state.step)
    state = _copy(state)  # the chunks donate their input: the caller's state stays usable
    losses = []
    t0 = time.perf_counter()
    compiled_before = _PROGRAMS.seconds
    platform = next(iter(X.devices())).platform

    def program(n: int, ix):
        key = program_key("fit", model, config, n, platform, arrays=(state, X, Y, ix))
        return _PROGRAMS(key, lambda: train_chunk.lower(state, X, Y, ix, model=model,
                                                        config=config, num_steps=n), platform)

    bar = progress_bar(config, start, progress)
    emit = bar.write if progress else log  # log lines above the bar, not through it
    try:
        for s, n in chunks(start, config.steps, config.chunk):
            ix = None if batch_ix is None else jnp.asarray(batch_ix[s:s + n])
            state, chunk_losses = program(n, ix)(state, X, Y, ix)
            chunk_losses = np.asarray(chunk_losses)  # the one host sync per chunk
            check_finite(chunk_losses, state, s, model, config, X, batch_ix)
            losses.append(chunk_losses)
            if log is not None:
                for i in range(-(-s // log_every) * log_every, s + n, log_every):
                    emit(f"{i:7d}/{config.steps:7d}: {chunk_losses[i - s]:.4f}")
            if on_chunk is not None:
                on_chunk(state, np.concatenate(losses))
            bar.update(n)
    finally:
        bar.close()
    all_losses = np.concatenate(losses) if losses else np.zeros(0, np.float32)
    return FitResult(state, all_losses, time.perf_counter() - t0,
                     _PROGRAMS.seconds - compiled_before)


@jax.jit
def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def all_finite(tree) -> jax.Array:
    """() bool: every float leaf of `tree` is finite (one small reduction per chunk)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def check_finite(chunk_losses: np.ndarray, state: TrainState, start: int, model: nn.Module,
                 config: TrainConfig, X: jax.Array, batch_ix=None) -> None:
    """DivergenceError naming the first non-finite step of a chunk, and its likely cause."""
    bad = np.flatnonzero(~np.isfinite(chunk_losses))
    if bad.size:
        step = int(start + bad[0])
        ix = batch_ix[step] if batch_ix is not None else sample_batch(
            state.key, step, X.shape[0], config.batch_size)
        xb = np.asarray(X[np.asarray(ix)])
        raise DivergenceError(f"loss became {chunk_losses[bad[0]]} at step {step}; "
                              f"{divergence_cause(model, config, xb)}", step=step)
    tree = (state.params, state.batch_stats, state.opt_state)
    check = _PROGRAMS(program_key("finite", arrays=tree), lambda: all_finite.lower(tree))
    if not bool(check(tree)):
        step = start + len(chunk_losses)
        raise DivergenceError(f"parameters became non-finite by step {step}; "
                              f"{divergence_cause(model, config)}", step=step)


SMALL_BN_BATCH = 8  # the deep network trains at 8 examples per minibatch, not at 5 (docs)


def divergence_cause(model: nn.Module, config: TrainConfig, xb: np.ndarray | None = None) -> str:
    """What to tell a user whose run stopped being finite; xb: the (B, T) minibatch, if known.

    Batch norm normalises by the minibatch's own spread. With no epsilon (the lecture's) it
    divides by zero when every example of a minibatch is the same. With only a few examples,
    its gradient grows as they get close to each other (up to 1/sqrt(epsilon) for identical
    ones) and kicks the weights to ever larger values, whatever the learning rate.
    """
    if has_batch_stats(model):
        from jaxmlp.models import BN_PRESETS

        eps = getattr(model, "bn_epsilon", None)
        preset = BN_PRESETS.get(getattr(model, "bn_semantics", None))
        eps = (preset.epsilon if preset else None) if eps is None else eps
        if xb is not None and eps == 0 and (xb == xb[0]).all():
            return (f"all {len(xb)} examples of its minibatch are the same, so batch norm's "
                    "standard deviation is 0 and it divides by zero (the lecture's batch norm "
                    "has no epsilon); use a larger --batch-size, or --bn-epsilon 1e-5")
        if config.batch_size < SMALL_BN_BATCH:
            return (f"with {config.batch_size} examples per minibatch, batch norm's gradient "
                    "grows as they get close to each other (up to 1/sqrt(epsilon) for "
                    "identical ones) and blows up the weights whatever the learning rate; use "
                    f"--batch-size {SMALL_BN_BATCH} or more")
    return (f"lower the learning rate (e.g. {lower_lr_hint(config)}) or check the "
            "initialisation")


def lower_lr_hint(config: TrainConfig) -> str:
    """The `--lr` flag with every rate of the schedule divided by 10."""
    if optim.is_custom(config):
        return "a tenth of your optimizer's rate"
    return "--lr " + ",".join(f"{lr / 10:g}" for lr in config.schedule.learning_rates)
