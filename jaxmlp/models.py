"""Flax modules: the lecture's batch norm and its embedding MLP.

Lecture names -> Flax variables of `MLP` (say it once, use the Flax names everywhere else):

    C               params/embed/embedding        (vocab_size, n_embd)
    W1, b1          params/hidden/kernel, bias     (block_size*n_embd, n_hidden), (n_hidden,)
    bngain, bnbias  params/bn/scale, bias          (n_hidden,)
    bnmean_running  batch_stats/bn/mean            (n_hidden,)
    bnstd_running   batch_stats/bn/std             (n_hidden,)  ("var" for variance presets)
    W2, b2          params/out/kernel, bias        (n_hidden, vocab_size), (vocab_size,)
    hpreact         the hidden pre-activation, input of `bn`
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxmlp.errors import ConfigError
from jaxmlp.init import calculate_gain, kaiming_normal, normal

# Full float32 matmuls on every backend: TPUs (bf16 passes) and Ampere+ GPUs (TF32) would
# otherwise round differently from the PyTorch CPU lecture and break number-for-number checks.
PRECISION = jax.lax.Precision.HIGHEST


def _transposed(x: jax.Array) -> jax.Array:
    """x.T as an array of its own: XLA would fold a bare transpose into the product that
    reads it, which is what `matmul` avoids."""
    return jax.lax.optimization_barrier(x.T)


def _tangent(x, w, dx, dw, precision):
    return jnp.dot(dx, w, precision=precision) + jnp.dot(x, dw, precision=precision)


def _cpu_tangent(x, w, dx, dw, precision):
    """`_tangent` written so that its transpose, the backward pass, hands XLA's CPU matmul
    library (YNNPACK) a weight gradient it takes. Differentiated as written, d(loss)/dw is
    x.T @ ct, a product whose left operand is read transposed: XLA computes it with a generic
    kernel at about half the speed. Here it is x.T stored @ ct, or for a narrow layer (fewer
    outputs than inputs: the vocabulary layer) (ct.T stored @ x).T, which keeps the wider
    dimension last. Equal to float32 rounding; for the lecture's layers, bit for bit
    (docs/speed.md)."""
    n_in, n_out = w.shape
    if n_out < n_in:
        d_w = jax.lax.optimization_barrier(jnp.dot(_transposed(dw), x.T, precision=precision)).T
    else:
        d_w = jnp.dot(_transposed(x).T, dw, precision=precision)
    return jnp.dot(dx, w, precision=precision) + d_w


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, precision=PRECISION) -> jax.Array:
    """x (B, I) @ w (I, O): the product of every Dense layer. Its value is the plain
    product's; its derivative is too, arranged on CPU for XLA's matmul kernels (a tenth of a
    training step; `_cpu_tangent`), plain elsewhere."""
    return jnp.dot(x, w, precision=precision)


@matmul.defjvp
def _matmul_jvp(precision, primals, tangents):
    x, w = primals
    tangent = jax.lax.platform_dependent(
        *primals, *tangents, cpu=functools.partial(_cpu_tangent, precision=precision),
        default=functools.partial(_tangent, precision=precision))
    return matmul(x, w, precision), tangent


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s `dot_general`: (..., I) @ (I, O) through `matmul`."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (tuple(lhs_contract), tuple(rhs_contract)) != ((lhs.ndim - 1,), (0,)) or any(batch) \
            or rhs.ndim != 2 or preferred_element_type is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type)
    y = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs, precision)
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])


# Every Dense layer of the models: full float32, `matmul`'s derivative.
Dense = functools.partial(nn.Dense, precision=PRECISION, dot_general=dense_dot_general)


@dataclass(frozen=True)
class BNSemantics:
    """How a batch norm normalises and tracks its running statistic.

    stat: "std" keeps a running standard deviation (the lecture by hand), "var" a variance.
    unbiased_norm / unbiased_running: Bessel's correction for normalising / for the running stat.
    momentum: weight of the *new* batch statistic (PyTorch's convention; Flax's own `momentum`
        is the weight of the old value, i.e. 1 - this).
    epsilon: added to the variance before the square root.
    """

    stat: str
    unbiased_norm: bool
    unbiased_running: bool
    momentum: float
    epsilon: float


BN_PRESETS: dict[str, BNSemantics] = {
    # hpreact.std(0) (unbiased), no epsilon; running std updated 0.999 old + 0.001 new.
    "lecture": BNSemantics("std", True, True, 0.001, 0.0),
    # The lecture's own BatchNorm1d class: x.var(0) (unbiased) everywhere, eps 1e-5, 0.9/0.1.
    "lecture-class": BNSemantics("var", True, True, 0.1, 1e-5),
    # torch.nn.BatchNorm1d: biased variance to normalise, unbiased into running_var.
    "torch": BNSemantics("var", False, True, 0.1, 1e-5),
    # flax.linen.BatchNorm defaults: biased everywhere, momentum 0.99 (old) = 0.01 (new).
    "flax": BNSemantics("var", False, False, 0.01, 1e-5),
}


class BatchNorm1d(nn.Module):
    """Batch norm over axis 0 of (B, features) with selectable framework semantics.

    In training mode it normalises with the batch statistics and updates the running ones in
    `batch_stats`; in eval mode it uses the running ones. `scale` is the lecture's bngain
    (init 1), `bias` its bnbias (init 0).

    Unlike `flax.linen.BatchNorm`, which raises when `batch_stats` is immutable in training
    mode, a training-mode call with an immutable `batch_stats` normalises with the batch
    statistics and leaves the running ones alone: a pure function of the batch, which the
    diagnostics use to probe a network without moving its statistics.
    """

    semantics: str = "lecture"
    momentum: float | None = None  # weight of the new value; None = the preset's
    epsilon: float | None = None  # None = the preset's
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    @property
    def spec(self) -> BNSemantics:
        if self.semantics not in BN_PRESETS:
            raise ValueError(
                f"unknown batch-norm semantics {self.semantics!r}; use one of {sorted(BN_PRESETS)}"
            )
        return BN_PRESETS[self.semantics]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # (B, F) -> (B, F)
        spec = self.spec
        momentum = spec.momentum if self.momentum is None else self.momentum
        eps = spec.epsilon if self.epsilon is None else self.epsilon
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        ra_stat = self.variable("batch_stats", spec.stat, jnp.ones, (features,))

        if train:
            n = x.shape[0]
            ddof = 1 if spec.unbiased_norm else 0
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                mean = x.mean(0)
                sq = jnp.square(x - mean).sum(0)  # the same sums as batch_norm_train's (CSE'd)
                var_run = sq / (n - 1 if spec.unbiased_running else n)
                batch_stat = jnp.sqrt(var_run) if spec.stat == "std" else var_run
                # The running statistics take no gradient (the lecture's torch.no_grad()).
                mean_sg, stat_sg = jax.lax.stop_gradient((mean, batch_stat))
                ra_mean.value = (1 - momentum) * ra_mean.value + momentum * mean_sg
                ra_stat.value = (1 - momentum) * ra_stat.value + momentum * stat_sg
            return batch_norm_train(x, scale, bias, ddof, eps)
        mean = ra_mean.value
        if spec.stat == "std" and eps == 0:
            denom = ra_stat.value  # the lecture divides by bnstd_running itself
        else:
            var = jnp.square(ra_stat.value) if spec.stat == "std" else ra_stat.value
            denom = jnp.sqrt(var + eps)
        return scale * (x - mean) / denom + bias


def _batch_statistics(x: jax.Array, ddof: int, eps: float):
    """x (B, F) -> x - mean (B, F) and sqrt(var + eps) (F,), var = sum of squares / (B - ddof)."""
    xc = x - x.mean(0)
    sq = jnp.square(xc).sum(0)  # two-pass: exact where E[x^2]-E[x]^2 cancels
    return xc, jnp.sqrt(sq / (x.shape[0] - ddof) + eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, ddof: int,
                     eps: float) -> jax.Array:
    """Training-mode batch norm of x (B, F): scale * (x - mean) / sqrt(var + eps) + bias.

    The value is the plain formula's; the derivative rule is the closed form (the lecture's
    "backprop ninja" batch norm) written as a JVP, so forward mode (jvp, Hessians) keeps
    working, and its transpose (the backward pass) needs two batch sums where autodiff of the
    formula makes five: about 8% of a batchnorm-stage training step on CPU.
    """
    xc, denom = _batch_statistics(x, ddof, eps)
    return scale * xc / denom + bias


@batch_norm_train.defjvp
def _batch_norm_train_jvp(ddof, eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    xc, denom = _batch_statistics(x, ddof, eps)
    xhat = xc / denom
    # d out = scale / denom * (dx - mean(dx) - xhat * sum(xhat * dx) / (B - ddof)) + ...
    # Written so that every per-feature factor multiplies a per-feature vector: transposed, the
    # batch sums then act on the cotangent itself and are shared with d(scale) = sum(ct * xhat)
    # and d(bias) = sum(ct), two batch sums in all, as in a hand-written backward pass.
    c = scale / denom
    neg_c = -c
    mean_dx = dx.mean(0)
    proj = (xhat * dx).sum(0) / (x.shape[0] - ddof)
    out = scale * xc / denom + bias
    return out, c * dx + neg_c * mean_dx + xhat * (neg_c * proj) + dscale * xhat + dbias


class MLP(nn.Module):
    """The lecture's embedding MLP: tokens (B, block_size) -> logits (B, vocab_size).

    embed -> concat -> hidden Dense (bias unless batchnorm) -> [BatchNorm1d] -> tanh -> out Dense.
    Every tensor is a N(0, 1) draw times its `*_scale`; the five stages differ only in those.
    `w1_scale` None is Kaiming's scale for tanh, (5/3) / sqrt(fan_in), fan_in = block_size *
    n_embd (the lecture's `* (5/3) / (n_embd * block_size)**0.5`).
    """

    vocab_size: int
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200
    c_scale: float = 1.0
    w1_scale: float | None = 1.0
    b1_scale: float = 1.0
    w2_scale: float = 1.0
    b2_scale: float = 1.0
    batchnorm: bool = False
    bn_semantics: str = "lecture"
    bn_momentum: float | None = None  # None = the preset's
    bn_epsilon: float | None = None  # None = the preset's

    @property
    def init_scales(self) -> dict[str, float]:
        """The factor of every N(0, 1) draw, w1's resolved: {'c_scale': 1.0, ...}."""
        w1 = self.w1_scale
        if w1 is None:
            w1 = calculate_gain("tanh") / math.sqrt(self.block_size * self.n_embd)
        return {"c_scale": self.c_scale, "w1_scale": w1, "b1_scale": self.b1_scale,
                "w2_scale": self.w2_scale, "b2_scale": self.b2_scale}

    @nn.compact
    def __call__(self, idx: jax.Array, train: bool = False) -> jax.Array:
        B = idx.shape[0]
        scales = self.init_scales
        emb = nn.Embed(self.vocab_size, self.n_embd, embedding_init=normal(scales["c_scale"]),
                       name="embed")(idx)  # (B, T, n_embd)
        embcat = emb.reshape(B, -1)  # (B, T*n_embd)
        hpreact = Dense(self.n_hidden, use_bias=not self.batchnorm,
                        kernel_init=normal(scales["w1_scale"]),
                        bias_init=normal(scales["b1_scale"]), name="hidden")(embcat)
        if self.batchnorm:  # the mean subtraction cancels b1, hence use_bias above
            hpreact = BatchNorm1d(self.bn_semantics, momentum=self.bn_momentum,
                                  epsilon=self.bn_epsilon, name="bn")(hpreact, train)
        h = jnp.tanh(hpreact)  # (B, n_hidden)
        self.sow("intermediates", "h", h)
        h = probe_point(self, "h", h)
        return Dense(self.vocab_size, kernel_init=normal(scales["w2_scale"]),
                     bias_init=normal(scales["b2_scale"]), name="out")(h)  # (B, vocab)


def probe_point(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """`module.perturb(name, x)`, except while initialising.

    jaxmlp.diagnostics passes a zero "perturbations" variable of x's shape and differentiates
    the loss with respect to it: that gradient is d(loss)/d(x), the lecture's `x.grad` after
    `x.retain_grad()`. Without that collection it is the identity. Creating no variable at
    init keeps `model.init(key, X[:2])` valid for batches of any size.
    """
    if module.is_initializing():
        return x
    return module.perturb(name, x)


NORMS = ("batchnorm", "layernorm", "none")
ACTIVATIONS = ("tanh", "relu")


class DeepMLP(nn.Module):
    """The lecture's deep network: embedding, `depth` x [Linear -> norm -> act], Linear -> norm.

    tokens (B, block_size) -> embed (B, block_size*n_embd) -> blocks of width n_hidden ->
    logits (B, vocab_size). Submodules are named after their index in the lecture's `layers`
    list, so "layer 5 (Tanh)" of its plots is `tanh5` here. With norm (deep, 17 layers):

        C                  params/embed/embedding                     (vocab_size, n_embd)
        layers[0]  Linear  params/linear0/kernel                      (30, 100)
        layers[1]  BatchNorm1d  params/bn1/scale, bias (gamma, beta); batch_stats/bn1/mean, var
        layers[2]  Tanh    intermediates/tanh2, perturbations/tanh2   (B, 100)
        ...        layers[3k], [3k+1], [3k+2]: linear{3k}, bn{3k+1}, tanh{3k+2}, k < depth
        layers[15] Linear  params/linear15/kernel                     (100, vocab_size)
        layers[16] BatchNorm1d  params/bn16/scale (gamma, x last_scale at init), bias

    Without norm (deep-nobn, 11 layers): linear0, tanh1, linear2, tanh3, ..., tanh9, linear10
    (each Linear with a bias). layernorm uses `ln{i}` in place of `bn{i}`, relu `relu{i}` in
    place of `tanh{i}`. Kernels are (in, out), like the lecture's `Linear.weight`.

    Initialisation (the lecture's): C ~ N(0, c_scale^2); each Linear weight N(0, 1)/sqrt(fan_in)
    times `gain`, biases zero. The output layer is made unconfident at init by `last_scale`:
    with a norm its scale (gamma) starts at last_scale (and its Linear takes `gain`, as the
    lecture's `layers[:-1]` loop does); without one, its weight is N(0, 1)/sqrt(fan_in) times
    last_scale instead of gain. Linear layers have a bias unless a batch norm follows
    (`use_bias=None`); its mean subtraction would cancel it.
    """

    vocab_size: int
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 100
    depth: int = 5  # hidden blocks; the output Linear(-> norm) comes on top
    norm: str = "batchnorm"  # batchnorm | layernorm | none
    activation: str = "tanh"  # tanh | relu
    gain: float = 1.0
    last_scale: float = 0.1
    use_bias: bool | None = None  # None: a bias unless norm == "batchnorm"
    c_scale: float = 1.0
    bn_semantics: str = "lecture-class"  # the lecture's BatchNorm1d class (unbiased var, 0.1)
    bn_momentum: float | None = None  # None = the preset's; calibrate() sets 1.0
    bn_epsilon: float | None = None  # None = the preset's

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; use one of "
                              f"{', '.join(ACTIVATIONS)}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ConfigError(f"depth must be a non-negative integer, got {self.depth!r}")
        if self.norm == "batchnorm" and self.bn_semantics not in BN_PRESETS:
            raise ConfigError(f"unknown batch-norm semantics {self.bn_semantics!r}; use one of "
                              f"{', '.join(BN_PRESETS)}")
        super().__post_init__()

    @property
    def batchnorm(self) -> bool:
        return self.norm == "batchnorm"

    @property
    def layer_names(self) -> list[str]:
        """The lecture's `layers` list as names: ['linear0', 'bn1', 'tanh2', ..., 'bn16']."""
        norm = {"batchnorm": "bn", "layernorm": "ln", "none": None}[self.norm]
        kinds = ["linear", *([norm] if norm else []), self.activation]
        names = [f"{k}{b * len(kinds) + j}" for b in range(self.depth)
                 for j, k in enumerate(kinds)]
        n = len(names)
        return [*names, f"linear{n}", *([f"{norm}{n + 1}"] if norm else [])]

    def _norm(self, name: str, x: jax.Array, train: bool, scale: float) -> jax.Array:
        scale_init = nn.initializers.ones if scale == 1 else nn.initializers.constant(scale)
        if self.norm == "batchnorm":
            return BatchNorm1d(self.bn_semantics, momentum=self.bn_momentum,
                               epsilon=self.bn_epsilon, scale_init=scale_init, name=name)(x, train)
        return nn.LayerNorm(epsilon=1e-5, scale_init=scale_init, name=name)(x)

    @nn.compact
    def __call__(self, idx: jax.Array, train: bool = False) -> jax.Array:
        names = iter(self.layer_names)
        bias = self.norm != "batchnorm" if self.use_bias is None else self.use_bias
        act = jnp.tanh if self.activation == "tanh" else jax.nn.relu

        def linear(x, features, weight_gain):
            return Dense(features, use_bias=bias, kernel_init=kaiming_normal(gain=weight_gain),
                         bias_init=nn.initializers.zeros, name=next(names))(x)

        B = idx.shape[0]
        x = nn.Embed(self.vocab_size, self.n_embd, embedding_init=normal(self.c_scale),
                     name="embed")(idx).reshape(B, -1)  # (B, block_size*n_embd)
        for _ in range(self.depth):
            x = linear(x, self.n_hidden, self.gain)  # (B, n_hidden)
            if self.norm != "none":
                x = self._norm(next(names), x, train, 1.0)
            name = next(names)
            x = act(x)
            self.sow("intermediates", name, x)
            x = probe_point(self, name, x)
        if self.norm == "none":
            return linear(x, self.vocab_size, self.last_scale)  # (B, vocab_size)
        x = linear(x, self.vocab_size, self.gain)
        return self._norm(next(names), x, train, self.last_scale)  # (B, vocab_size)
