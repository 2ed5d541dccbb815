"""Weight initialisers as Flax initializers (`init(key, shape, dtype) -> Array`).

The PyTorch names and formulas, for Flax's layouts:

    calculate_gain(nonlinearity, param)   torch.nn.init.calculate_gain, value for value
    kaiming_normal / kaiming_uniform      std = gain / sqrt(fan), fan = fan_in or fan_out
    xavier_normal / xavier_uniform        std = gain * sqrt(2 / (fan_in + fan_out))  (Glorot)
    torch_linear_default                  nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    normal(std)                           the lecture's `torch.randn(...) * std`
    zeros / constant(value)               the inits that fail (symmetry is never broken)
    fan_in_demo / linear_bn_demo          the articles' demonstrations of why scale matters

They compute the standard deviation as torch does, `gain / sqrt(fan)` in double precision,
then draw in float32. `jax.nn.initializers.variance_scaling` takes the square root of a float32
variance instead, which differs in the last bit for most fans (tests/test_init.py checks both
ways), and would change the seed-0 runs' initial weights: these keep torch's arithmetic.

A uniform draw U(-b, b) has std b / sqrt(3), so every `*_uniform` uses b = sqrt(3) * std.

Layouts: a Flax `Dense` kernel is (in, out), the transpose of torch's `nn.Linear.weight`
(out, in), so for a 2-D kernel fan_in = shape[0] and fan_out = shape[1]. (The lecture's own
`Linear` class also stores (fan_in, fan_out).) A Flax conv kernel is (*window, in, out):
fan_in = in * prod(window), fan_out = out * prod(window), as torch computes for (out, in,
*window). Set `in_axis` / `out_axis` for other layouts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxmlp.errors import ConfigError

Initializer = nn.initializers.Initializer

LINEAR_FNS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d")
NONLINEARITIES = (*LINEAR_FNS, "sigmoid", "tanh", "relu", "leaky_relu", "selu")
FAN_MODES = ("fan_in", "fan_out")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity, exactly as `torch.nn.init.calculate_gain`.

    linear, conv*, sigmoid: 1; tanh: 5/3; relu: sqrt(2); selu: 3/4;
    leaky_relu: sqrt(2 / (1 + slope^2)) with `param` the negative slope (default 0.01).
    """
    if nonlinearity in LINEAR_FNS or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise ConfigError(f"leaky_relu's negative slope must be a number, got {param!r}; "
                              "pass e.g. param=0.01")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4  # found empirically (pytorch/pytorch#50664)
    raise ConfigError(f"unsupported nonlinearity {nonlinearity!r}; use one of "
                      f"{', '.join(NONLINEARITIES)}")


def compute_fans(shape: Sequence[int], in_axis: int = -2, out_axis: int = -1) -> tuple[int, int]:
    """(fan_in, fan_out) of a kernel; every other axis counts as receptive field (conv window)."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ConfigError(f"fan-in and fan-out need a kernel of 2 or more dimensions, got shape "
                          f"{shape}; for a bias pass fan_in explicitly (torch_linear_default)")
    ndim = len(shape)
    in_axis, out_axis = in_axis % ndim, out_axis % ndim
    if in_axis == out_axis:
        raise ConfigError(f"in_axis and out_axis are the same axis ({in_axis}); give two axes")
    receptive = math.prod(s for i, s in enumerate(shape) if i not in (in_axis, out_axis))
    return shape[in_axis] * receptive, shape[out_axis] * receptive


def _fan(shape, mode: str, in_axis: int, out_axis: int) -> int:
    if mode not in FAN_MODES:
        raise ConfigError(f"unknown mode {mode!r}; use fan_in or fan_out")
    fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
    return fan_in if mode == "fan_in" else fan_out


def _resolve_gain(gain: float | None, nonlinearity: str, a: float | None) -> float:
    return calculate_gain(nonlinearity, a) if gain is None else gain


def scaled_draw(draw: jax.Array, scale: float) -> jax.Array:
    """`draw * scale`, rounded as op-by-op (eager) code rounds it, also inside one `jit`.

    Compiled together, XLA would fold the scale into the draw's own last multiply (normal
    draws end with `sqrt(2) * erfinv(u)`), which rounds differently in the last bit: the
    barrier keeps a compiled initialisation equal to the eager one, bit for bit.
    """
    return jax.lax.optimization_barrier(draw) * jnp.asarray(scale, draw.dtype)


def normal(std: float = 1.0) -> Initializer:
    """N(0, std^2): N(0, 1) draws times `std`, as the lecture's `torch.randn(shape) * std`."""

    def init(key, shape, dtype=jnp.float32):
        return scaled_draw(jax.random.normal(key, shape, dtype), std)

    return init


def uniform(bound: float) -> Initializer:
    """U(-bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_normal(a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", *,
                   gain: float | None = None, in_axis: int = -2,
                   out_axis: int = -1) -> Initializer:
    """He init, N(0, std^2) with std = gain / sqrt(fan); torch.nn.init.kaiming_normal_.

    The gain is `calculate_gain(nonlinearity, a)` (torch's defaults give sqrt(2), i.e. ReLU's
    N(0, 2/fan_in)) unless `gain` is given. The lecture's `randn(fan_in, fan_out) / fan_in**0.5
    * 5/3` is `kaiming_normal(nonlinearity="tanh")`.
    """
    g = _resolve_gain(gain, nonlinearity, a)
    if mode not in FAN_MODES:
        raise ConfigError(f"unknown mode {mode!r}; use fan_in or fan_out")

    def init(key, shape, dtype=jnp.float32):
        std = g / math.sqrt(_fan(shape, mode, in_axis, out_axis))
        return scaled_draw(jax.random.normal(key, shape, dtype), std)

    return init


def kaiming_uniform(a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", *,
                    gain: float | None = None, in_axis: int = -2,
                    out_axis: int = -1) -> Initializer:
    """He init, U(-b, b) with b = sqrt(3) * gain / sqrt(fan); torch.nn.init.kaiming_uniform_."""
    g = _resolve_gain(gain, nonlinearity, a)
    if mode not in FAN_MODES:
        raise ConfigError(f"unknown mode {mode!r}; use fan_in or fan_out")

    def init(key, shape, dtype=jnp.float32):
        bound = math.sqrt(3.0) * g / math.sqrt(_fan(shape, mode, in_axis, out_axis))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _xavier_std(shape, gain, in_axis, out_axis) -> float:
    fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def xavier_normal(gain: float = 1.0, *, in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """Glorot: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)); torch's xavier_normal_."""

    def init(key, shape, dtype=jnp.float32):
        std = _xavier_std(shape, gain, in_axis, out_axis)
        return scaled_draw(jax.random.normal(key, shape, dtype), std)

    return init


def xavier_uniform(gain: float = 1.0, *, in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """Glorot: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out)); torch's xavier_uniform_."""

    def init(key, shape, dtype=jnp.float32):
        bound = math.sqrt(3.0) * _xavier_std(shape, gain, in_axis, out_axis)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear_default(fan_in: int | None = None, *, in_axis: int = -2,
                         out_axis: int = -1) -> Initializer:
    """PyTorch's default `nn.Linear` init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (torch writes it as kaiming_uniform_(a=sqrt(5)), whose bound works out to 1/sqrt(fan_in).)
    For a kernel, fan_in comes from its shape; a bias (1-D) needs the layer's `fan_in` given,
    as torch draws the bias with the weight's fan_in: `nn.Dense(bias_init=
    torch_linear_default(fan_in=n_in))`.
    """
    if fan_in is not None and (not isinstance(fan_in, int) or fan_in < 1):
        raise ConfigError(f"fan_in must be a positive integer, got {fan_in!r}")

    def init(key, shape, dtype=jnp.float32):
        n = fan_in if fan_in is not None else compute_fans(shape, in_axis, out_axis)[0]
        bound = 1.0 / math.sqrt(n)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def zeros(key, shape, dtype=jnp.float32) -> jax.Array:
    """All zeros: a hidden layer whose weights are all zero gets zero gradients and never moves."""
    return jnp.zeros(shape, dtype)


def constant(value: float) -> Initializer:
    """Every entry `value`: every unit of the layer computes the same function forever."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.full(shape, value, dtype)

    return init


# --- The articles' demonstrations: why the scale of a draw matters --------------------------

@functools.partial(jax.jit, static_argnames="scales")
def _fan_in_outputs(key: jax.Array, scales: tuple[tuple[str, float], ...]):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (1000, 10))
    w = jax.random.normal(kw, (10, 200))
    return x, {label: jnp.matmul(x, w * s, precision=jax.lax.Precision.HIGHEST)
               for label, s in scales}


def fan_in_demo(key: jax.Array, scales: dict[str, float] | None = None) -> dict[str, Any]:
    """x ~ N(0, 1) (1000, 10) times w ~ N(0, 1) (10, 200) * scale: output std ~ scale*sqrt(10).

    Returns {"x": x, "outputs": {label: y (1000, 200)}}; the default scales are the articles'
    1, 0.2, 1/sqrt(10) and (5/3)/sqrt(10) (std about 3.2, 0.65, 1.0 and 1.65).
    """
    if scales is None:
        scales = {"w": 1.0, "w * 0.2": 0.2, "w / sqrt(10)": 1 / math.sqrt(10),
                  "w * (5/3) / sqrt(10)": (5 / 3) / math.sqrt(10)}
    x, outputs = _fan_in_outputs(key, tuple(scales.items()))
    return {"x": x, "outputs": {label: outputs[label] for label in scales}}  # in given order


@functools.partial(jax.jit, static_argnames="n")
def linear_bn_demo(key: jax.Array, n: int = 1000) -> dict[str, dict[str, jax.Array]]:
    """Forward and backward std through W @ x, without and with a batch norm after it.

    W (n, n) and x (n, 1) unit Gaussians, an upstream gradient ~ N(0, 1). Without batch norm
    the output std and the input gradient's std are both about sqrt(n) (31.6 for 1000); with
    a batch norm (the lecture's class; the n outputs form its batch) both come back to about 1.
    """
    from jaxmlp.models import BatchNorm1d

    kw, kx, kg = jax.random.split(key, 3)
    W = jax.random.normal(kw, (n, n))
    x = jax.random.normal(kx, (n, 1))
    upstream = jax.random.normal(kg, (n, 1))
    bn = BatchNorm1d("lecture-class")
    bn_vars = bn.init(key, jnp.zeros((2, 1)), train=False)

    def linear(x):
        return jnp.matmul(W, x, precision=jax.lax.Precision.HIGHEST)

    def linear_bn(x):
        return bn.apply(bn_vars, linear(x), train=True)

    out = {}
    for label, f in (("Linear", linear), ("Linear + BatchNorm", linear_bn)):
        y, vjp = jax.vjp(f, x)
        (dx,) = vjp(upstream)
        out[label] = {"x": x, "y": y, "dy": upstream, "dx": dx}
    return out
