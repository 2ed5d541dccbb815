"""Evaluation (split losses in eval mode, batch-norm calibration) and sampling names."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxmlp import limits, train
from jaxmlp.data import Dataset, Vocab
from jaxmlp.errors import ConfigError
from jaxmlp.train import cross_entropy


def eval_loss(variables, X: jax.Array, Y: jax.Array, model: nn.Module,
              batch_size: int | None = None) -> jax.Array:
    """Eval-mode (running batch-norm statistics) mean loss of X (N, T), Y (N,).

    Evaluated in compiled batches of `batch_size` examples (default: as many as fit
    `limits.eval_bytes()` of activations, all of them for the lecture's models), so that any
    model that trains also evaluates.
    """
    batch_size = limits.eval_batch_size(model, X.shape[0]) if batch_size is None else batch_size
    return _eval_splits(variables, ((X, Y),), model=model, batch_sizes=(batch_size,))[0]


def split_losses(model: nn.Module, variables, data: Dataset,
                 splits=("train", "val", "test")) -> dict[str, float]:
    """{'train': ..., 'val': ..., 'test': ...}: the lecture's `split_loss` for each split,
    all in one compiled program."""
    arrays = tuple(tuple(map(jnp.asarray, data.split(s))) for s in splits)
    sizes = tuple(limits.eval_batch_size(model, len(Y)) for _, Y in arrays)
    losses = jax.device_get(_eval_splits(variables, arrays, model=model, batch_sizes=sizes))
    return {s: float(loss) for s, loss in zip(splits, losses, strict=True)}


def final_losses(model: nn.Module, variables, data: Dataset) -> dict:
    """A trained run's metrics: {'train', 'val', 'test'} with the running statistics, and for
    batch norm 'calibrated': the same with statistics over the whole training split (None when
    that pass does not fit `limits.eval_bytes()`; left out for a module without a `bn_momentum`
    field, which cannot be calibrated). One compiled program: the passes share the layers
    before the batch norm (XLA computes them once)."""
    splits = ("train", "val", "test")
    arrays = tuple(tuple(map(jnp.asarray, data.split(s))) for s in splits)
    sizes = tuple(limits.eval_batch_size(model, len(Y)) for _, Y in arrays)
    calibratable = bool(variables.get("batch_stats")) and hasattr(model, "bn_momentum")
    both = calibratable and sizes[0] >= len(data.train.Y)
    static = dict(model=model, batch_sizes=sizes, calibrated=both)
    program = train._PROGRAMS(train.program_key("final_losses", *static.values(),
                                                arrays=(variables, arrays)),
                              lambda: _eval_final.lower(variables, arrays, **static))
    losses = jax.device_get(program(variables, arrays))
    out = {s: float(v) for s, v in zip(splits, losses[0], strict=True)}
    if calibratable:
        out["calibrated"] = ({s: float(v) for s, v in zip(splits, losses[1], strict=True)}
                             if both else None)
    return out


@functools.partial(jax.jit, static_argnames=("model", "batch_sizes", "calibrated"))
def _eval_final(variables, arrays, model: nn.Module, batch_sizes: tuple[int, ...],
                calibrated: bool):
    running = _eval_splits(variables, arrays, model=model, batch_sizes=batch_sizes)
    if not calibrated:
        return running, ()
    full = _calibrate(variables, arrays[0][0], model=model)
    return running, _eval_splits(full, arrays, model=model, batch_sizes=batch_sizes)


@functools.partial(jax.jit, static_argnames=("model", "batch_sizes"))
def _eval_splits(variables, arrays, model: nn.Module, batch_sizes: tuple[int, ...]):
    return tuple(_mean_loss(variables, X, Y, model, b)
                 for (X, Y), b in zip(arrays, batch_sizes, strict=True))


def _mean_loss(variables, X, Y, model: nn.Module, batch_size: int) -> jax.Array:
    """Mean loss of X (N, T), Y (N,): at once, or in batches of `batch_size` (traced)."""
    n = X.shape[0]
    if batch_size >= n:
        return cross_entropy(model.apply(variables, X, train=False), Y)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    Xb = jnp.pad(X, ((0, pad), (0, 0))).reshape(nb, batch_size, -1)
    Yb = jnp.pad(Y, (0, pad)).reshape(nb, batch_size)
    keep = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)  # padding adds nothing

    def add(total, batch):
        x, y, k = batch
        losses = optax.softmax_cross_entropy_with_integer_labels(
            model.apply(variables, x, train=False), y)
        return total + jnp.where(k, losses, 0.0).sum(), None

    total, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32), (Xb, Yb, keep))
    return total / n


def calibrate(variables, X: jax.Array, model: nn.Module):
    """The lecture's alternative to running statistics: batch-norm mean/std over all of X.

    One training-mode pass over the whole set with momentum 1, so that every running
    statistic becomes exactly the full-set statistic. Returns variables with new batch_stats.
    ConfigError when the pass would not fit `limits.eval_bytes()`.
    """
    if not variables.get("batch_stats"):
        return variables
    if not hasattr(model, "bn_momentum"):
        raise ConfigError(f"{type(model).__name__} has no bn_momentum field, so its batch-norm "
                          "statistics cannot be calibrated (momentum 1 makes them the full "
                          "set's); add one, or use the running statistics")
    if limits.eval_batch_size(model, X.shape[0]) < X.shape[0]:
        raise ConfigError(f"calibrating batch norm on {X.shape[0]:,} examples at once would "
                          f"need more than {limits.eval_bytes() >> 20:,} MiB of activations; use "
                          "the running statistics (eval without --calibrate)")
    return _calibrate(variables, X, model=model)


@functools.partial(jax.jit, static_argnames="model")
def _calibrate(variables, X: jax.Array, model: nn.Module):
    _, updates = model.copy(bn_momentum=1.0).apply(variables, X, train=True,
                                                   mutable=["batch_stats"])
    return {**variables, "batch_stats": updates["batch_stats"]}


@functools.partial(jax.jit, static_argnames=("model", "num", "max_len"))
def sample_tokens(variables, key: jax.Array, model: nn.Module, num: int,
                  max_len: int = 64) -> jax.Array:
    """`num` names sampled in parallel, as (num, max_len) int32 tokens.

    The lecture's sampler: start from context [0]*block_size, draw the next token from the
    softmax, shift the context; a name ends at its first 0 (later tokens are meaningless).
    """
    context = jnp.zeros((num, model.block_size), jnp.int32)

    def step(context, k):
        logits = model.apply(variables, context, train=False)  # (num, vocab)
        ix = jax.random.categorical(k, logits).astype(jnp.int32)  # (num,)
        return jnp.concatenate([context[:, 1:], ix[:, None]], axis=1), ix

    _, tokens = jax.lax.scan(step, context, jax.random.split(key, max_len))
    return tokens.T


def sample_names(model: nn.Module, variables, vocab: Vocab, key: jax.Array, num: int = 20,
                 max_len: int = 64) -> list[str]:
    """Decoded names; one that has not ended after `max_len` characters is cut there."""
    tokens = np.asarray(sample_tokens(variables, key, model=model, num=num, max_len=max_len))
    return [vocab.decode(row) for row in tokens]


def _note_unfinished(ck, run, log) -> None:
    """Say that an unfinished run's last checkpoint was used (after the work succeeded)."""
    from jaxmlp import checkpoint as ckpt

    if log is not None and not ckpt.is_finished(run):
        log(f"note: {run} is unfinished (step {ck.step:,} of {ck.spec.train.steps:,}); used "
            "its last checkpoint")


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def evaluate_run(run, data=None, calibrated: bool = False, log=_stderr) -> dict[str, float]:
    """`jaxmlp eval`: the split losses of the run in directory `run`, on the names it was
    trained on (`data` defaults to the file its run.json records; DataError if the file's
    content is not what the run trained on). calibrated: full-training-set batch-norm
    statistics instead of the running ones. An unfinished run's last checkpoint is used, and
    `log` says so."""
    from jaxmlp.checkpoint import load_checkpoint
    from jaxmlp.data import load_dataset
    from jaxmlp.errors import DataError

    ck = load_checkpoint(run)
    spec = ck.spec
    path = spec.data if data is None else data
    dataset = load_dataset(path, block_size=spec.model.block_size, vocab=spec.vocab)
    if ck.data_sha256 and dataset.sha256 != ck.data_sha256:
        raise DataError(f"data file {str(path)!r} is not the one run {str(run)!r} was trained "
                        "on (its SHA-256 differs); pass --data with the original names file")
    variables = ck.state.variables
    if calibrated:
        variables = calibrate(variables, jnp.asarray(dataset.train.X), model=spec.model)
    losses = split_losses(spec.model, variables, dataset)
    _note_unfinished(ck, run, log)
    return losses


def sample_run(run, num: int = 20, seed: int = 0, log=_stderr) -> list[str]:
    """`jaxmlp sample`: `num` names from the run in directory `run`, drawn from key `seed`."""
    from jaxmlp.checkpoint import load_checkpoint

    ck = load_checkpoint(run)
    spec = ck.spec
    need = num * limits.activation_floats(spec.model) * 4
    if need > limits.eval_bytes():
        raise ConfigError(f"sampling {num:,} names at once from this model needs about "
                          f"{need / 2**30:.1f} GiB; ask for fewer with -n")
    names = sample_names(spec.model, ck.state.variables, spec.vocab, jax.random.key(seed),
                         num=num)
    _note_unfinished(ck, run, log)
    return names
