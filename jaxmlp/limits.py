"""What a run may ask of the machine, checked before anything is written.

    MAX_STEPS, MAX_SEED, MAX_PARAMS   the step counter is int32; JAX keeps 32 bits of a seed;
                                      1 GiB of float32 parameters
    MAX_RUNS                          runs in one sweep
    check_seed                        an integer seed JAX can tell from every other
    check_learning_rates              positive and representable in float32
    memory_needed                     an upper estimate of a run's device memory, by part
    check_memory                      that estimate against the device's memory
    eval_batch_size                   examples per compiled evaluation batch

Every check raises ConfigError naming the number, the limit and the option to change.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmlp.errors import ConfigError

MAX_STEPS = 2**31 - 1  # TrainState.step is int32
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed: larger ones repeat smaller ones
MAX_PARAMS = 1 << 28  # 1 GiB of float32 parameters, before gradients and optimizer state
MAX_RUNS = 1 << 16  # runs in one sweep: checked before a list of them is even made
F32_MAX, F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)
# A chunk's gathered minibatches at most; beyond, the steps gather their own (the same indices).
GATHER_BYTES = 64 << 20


def check_seed(seed, flag: str = "--seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
            0 <= seed <= MAX_SEED):
        raise ConfigError(f"{flag} must be between 0 and {MAX_SEED} (an integer: JAX keys keep "
                          f"32 bits of it), got {seed!r}")


def check_runs(n_seeds: int, n_configs: int = 1) -> None:
    """ConfigError for a sweep of more than MAX_RUNS runs (seeds x stages x settings)."""
    if n_seeds * n_configs > MAX_RUNS:
        raise ConfigError(f"{n_seeds:,} seeds x {n_configs:,} settings is more than the "
                          f"{MAX_RUNS:,} runs one sweep trains; use fewer --seeds")


def check_learning_rates(rates) -> None:
    """Positive and finite, and neither overflowing float32 nor rounding to zero in it."""
    bad = [lr for lr in rates if isinstance(lr, bool) or not isinstance(lr, (int, float))
           or not lr > 0 or not math.isfinite(lr)]
    if bad:
        raise ConfigError(f"learning rates must be positive and finite, got {list(rates)}")
    for lr in rates:
        if lr > F32_MAX:
            raise ConfigError(f"learning rate {lr:g} overflows float32 (at most {F32_MAX:.3g}); "
                              "use a smaller --lr")
        if lr < F32_TINY:
            raise ConfigError(f"learning rate {lr:g} underflows float32 (at least "
                              f"{F32_TINY:.3g}: smaller rates train nothing); use a larger --lr")


def param_shapes(model: nn.Module):
    """The shapes of `model`'s parameters, a tree of ShapeDtypeStruct (traced, nothing
    computed)."""
    return _sizes(model)[0]


def count_params(model: nn.Module) -> int:
    """The number of parameters `model` has."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(model)))


def example_tokens(model: nn.Module, n: int) -> jax.Array:
    return jnp.zeros((n, model.block_size), jnp.int32)


def activation_floats(model: nn.Module) -> int:
    """Floats one example leaves in memory on its way through the model: twice the outputs of
    every submodule (an activation function's output beside each layer's)."""
    return _sizes(model)[1]


@functools.cache
def _sizes(model: nn.Module) -> tuple[Any, int]:
    """(parameter shapes, activation floats per example), from one abstract init and apply."""
    def forward():
        variables = model.init(jax.random.key(0), example_tokens(model, 2), train=False)
        _, state = model.apply(variables, example_tokens(model, 2), train=False,
                               capture_intermediates=True, mutable=["intermediates"])
        return variables.get("params", {}), state["intermediates"]

    params, inter = jax.eval_shape(forward)
    return (params, 2 * sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(inter) if x.ndim >= 1))


@functools.cache
def eval_bytes() -> int:
    """Activations one compiled evaluation batch may hold: an eighth of the device's memory,
    from 256 MiB to 4 GiB; enough for the lecture's models to evaluate a split at once."""
    memory = device_memory() or 8 << 30
    return int(min(4 << 30, max(256 << 20, memory // 8)))


def eval_batch_size(model: nn.Module, n: int, per_example: int | None = None) -> int:
    """Examples per evaluation batch: all n when they fit `eval_bytes()`."""
    per_example = per_example or activation_floats(model)
    return int(max(1, min(n, eval_bytes() // (4 * per_example))))


def memory_needed(model: nn.Module, *, batch_size: int, chunk: int, n_examples: int,
                  optimizer_slots: int = 0, stream_steps: int = 0) -> dict[str, int]:
    """Bytes a training run needs, by part (an upper estimate; `sum(...)` for the total).

    Parameters, gradients, updates and optimizer slots, twice (a chunk's input and output); one
    minibatch's activations, forward and backward; a chunk's gathered minibatches; the three
    splits on the device; one evaluation batch; the PyTorch lecture's minibatch indices on the
    host (int64 while drawn, then int32).
    """
    p = count_params(model)
    per_example = activation_floats(model)
    t = model.block_size + 1
    return {
        "parameters and optimizer state": int(4 * p * (3 + optimizer_slots) * 2),
        "a minibatch's activations": 4 * batch_size * per_example * 3,
        "a chunk's minibatches": min(4 * chunk * batch_size * t, GATHER_BYTES),
        "the data": 4 * n_examples * t,
        "an evaluation batch": 4 * per_example * eval_batch_size(model, n_examples, per_example),
        "the lecture's minibatch stream": 12 * stream_steps * batch_size,
    }


def device_memory(device: jax.Device | None = None) -> int | None:
    """Bytes of memory the device offers: an accelerator's own limit; for a CPU the host's RAM,
    or the container's limit where that is lower."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend reports memory
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return min(physical, container_memory() or physical)


# A container's memory limit: the host's RAM is what sysconf reports, not what the kernel allows
# this process before it kills it.
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def container_memory(paths=CGROUP_LIMITS) -> int | None:
    """The cgroup (v2, then v1) memory limit in bytes, or None where there is none."""
    for path in paths:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "unlimited" 2**63 - 4096
            return int(text)
    return None


def check_memory(parts: dict[str, int], limit: int | None = None, fraction: float = 0.9,
                 fix: str | None = None) -> None:
    """ConfigError if `parts` add up to more than `fraction` of the device's memory."""
    limit = device_memory() if limit is None else limit
    need = sum(parts.values())
    if limit is None or need <= fraction * limit:
        return
    biggest = max(parts, key=parts.get)
    fix = fix or {"parameters and optimizer state": "a smaller --n-hidden, --n-embd or "
                  "--block-size", "a minibatch's activations": "a smaller --batch-size or "
                  "--n-hidden", "an evaluation batch": "a smaller --n-hidden",
                  "a chunk's minibatches": "a smaller --batch-size", "the data": "a smaller "
                  "names file", "the lecture's minibatch stream": "fewer --steps (or no "
                  "--torch-stream)"}.get(biggest, "a smaller run")
    raise ConfigError(f"the run would need about {need / 2**30:,.1f} GiB of memory (mostly "
                      f"{biggest}: {parts[biggest] / 2**30:,.1f} GiB), more than the "
                      f"{fraction:.0%} of {limit / 2**30:,.1f} GiB this device has; use {fix}")
