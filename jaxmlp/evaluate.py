"""Evaluation (split losses in eval mode, batch-norm calibration) and sampling names."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmlp.data import Dataset, Vocab
from jaxmlp.train import cross_entropy


@functools.partial(jax.jit, static_argnames="model")
def eval_loss(variables, X: jax.Array, Y: jax.Array, model: nn.Module) -> jax.Array:
    """Eval-mode (running batch-norm statistics) mean loss of X (N, T), Y (N,)."""
    return cross_entropy(model.apply(variables, X, train=False), Y)


def split_losses(model: nn.Module, variables, data: Dataset,
                 splits=("train", "val", "test")) -> dict[str, float]:
    """{'train': ..., 'val': ..., 'test': ...}: the lecture's `split_loss` for each split."""
    return {s: float(eval_loss(variables, *map(jnp.asarray, data.split(s)), model=model))
            for s in splits}


@functools.partial(jax.jit, static_argnames="model")
def calibrate(variables, X: jax.Array, model: nn.Module):
    """The lecture's alternative to running statistics: batch-norm mean/std over all of X.

    One training-mode pass over the whole set with momentum 1, so that every running
    statistic becomes exactly the full-set statistic. Returns variables with new batch_stats.
    """
    if not variables.get("batch_stats"):
        return variables
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
