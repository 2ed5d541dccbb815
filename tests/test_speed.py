"""The fused loop's speed-ups keep the numbers: chunk-drawn minibatches, batch norm's JVP rule,
the Dense layers' product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp.models import BN_PRESETS, PRECISION, BatchNorm1d, Dense, batch_norm_train, matmul
from jaxmlp.train import sample_batch, sample_batches


def test_chunk_draw_is_the_per_step_draw():
    key = jax.random.key(7)
    draws = jax.jit(sample_batches, static_argnums=(2, 3, 4))
    one = jax.jit(sample_batch, static_argnums=(2, 3))
    rows = np.asarray(draws(key, jnp.int32(95), 10, 1000, 32))
    for i in range(10):
        np.testing.assert_array_equal(rows[i], np.asarray(one(key, jnp.int32(95 + i), 1000, 32)))
    # Chunking changes nothing: steps 95..104 drawn as 95..99 and 100..104.
    split = np.concatenate([draws(key, jnp.int32(95), 5, 1000, 32),
                            draws(key, jnp.int32(100), 5, 1000, 32)])
    np.testing.assert_array_equal(rows, split)
    assert rows.min() >= 0 and rows.max() < 1000 and len(np.unique(rows)) > 200


def plain_batch_norm(x, scale, bias, ddof, eps):
    """The formula as written (autodiff differentiates it op by op)."""
    mean = x.mean(0)
    var = jnp.square(x - mean).sum(0) / (x.shape[0] - ddof)
    return scale * (x - mean) / jnp.sqrt(var + eps) + bias


@pytest.mark.parametrize("ddof, eps", [(1, 0.0), (0, 1e-5), (1, 1e-5)])
def test_batch_norm_rule_matches_autodiff(ddof, eps):
    kx, ks, kb, kc, kt = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(kx, (32, 50)) * 3 + 1
    scale, bias = 1 + 0.1 * jax.random.normal(ks, (50,)), jax.random.normal(kb, (50,))
    ct = jax.random.normal(kc, (32, 50))
    args = (x, scale, bias)
    tangents = tuple(jax.random.normal(kt, a.shape) for a in args)

    @jax.jit
    def everything(args, tangents):  # value, gradient, forward mode, Hessian-vector product
        out = {}
        for name, f in (("ours", lambda *a: batch_norm_train(*a, ddof, eps)),
                        ("plain", lambda *a: plain_batch_norm(*a, ddof, eps))):
            loss = lambda *a, f=f: jnp.sum(jnp.tanh(f(*a)) * ct)  # noqa: E731
            out[name] = (f(*args), jax.grad(loss, argnums=(0, 1, 2))(*args),
                         jax.jvp(f, args, tangents)[1],
                         jax.jvp(jax.grad(loss), args, tangents)[1])
        return out

    r = everything(args, tangents)
    value, grads, jvp, hvp = r["ours"]
    np.testing.assert_allclose(value, r["plain"][0], rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(grads, r["plain"][1], strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)
    # Forward mode and second derivatives work (a custom_vjp would refuse them).
    np.testing.assert_allclose(jvp, r["plain"][2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hvp, r["plain"][3], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("semantics", sorted(BN_PRESETS))
def test_module_gradient_matches_the_plain_formula(semantics):
    spec = BN_PRESETS[semantics]
    x = jax.random.normal(jax.random.key(1), (16, 8)) * 2
    bn = BatchNorm1d(semantics)
    variables = bn.init(jax.random.key(2), x, train=True)
    ct = jax.random.normal(jax.random.key(3), (16, 8))

    def via_module(x, params):
        out, _ = bn.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out * ct)

    def via_formula(x, params):
        return jnp.sum(plain_batch_norm(x, params["scale"], params["bias"],
                                        1 if spec.unbiased_norm else 0, spec.epsilon) * ct)

    grads = jax.jit(lambda x, p: (jax.grad(via_module, (0, 1))(x, p),
                                  jax.grad(via_formula, (0, 1))(x, p)))(x, variables["params"])
    for g1, g2 in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_in, n_out", [(30, 200), (200, 27), (64, 64), (5, 3)])
def test_matmul_derivatives_are_the_plain_products(n_in, n_out):
    """`matmul` arranges its backward pass for the CPU's matmul library (wide and narrow
    layers differently); the derivatives stay those of x @ w to float32 rounding (another
    kernel may sum in another order), in reverse and forward mode, and under vmap."""
    kx, kw, kc, kt = jax.random.split(jax.random.key(n_in * n_out), 4)
    x, w = jax.random.normal(kx, (32, n_in)), jax.random.normal(kw, (n_in, n_out))
    ct = jax.random.normal(kc, (32, n_out))
    tangents = (jax.random.normal(kt, x.shape), jax.random.normal(kt, w.shape))
    plain = lambda x, w: jnp.dot(x, w, precision=PRECISION)  # noqa: E731

    @jax.jit
    def everything(x, w):
        out = {}
        for name, f in (("ours", matmul), ("plain", plain)):
            loss = lambda x, w, f=f: jnp.sum(jnp.tanh(f(x, w)) * ct)  # noqa: E731
            out[name] = (f(x, w), jax.grad(loss, (0, 1))(x, w),
                         jax.jvp(f, (x, w), tangents)[1],
                         jax.jvp(jax.grad(loss, 1), (x, w), tangents)[1],
                         jax.vmap(jax.grad(loss, 1))(jnp.stack([x, -x]), jnp.stack([w, 2 * w])))
        return out

    r = everything(x, w)
    for ours, theirs in zip(jax.tree.leaves(r["ours"]), jax.tree.leaves(r["plain"]), strict=True):
        # float32 sums of up to 200 terms: rounding relative to the largest element
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-6 * np.abs(theirs).max())


def test_dense_keeps_flax_names_and_values():
    """The models' `Dense` is `nn.Dense` with `matmul` as its product: same variables, same
    outputs, inputs with any leading dimensions."""
    from flax import linen as nn

    x = jax.random.normal(jax.random.key(0), (4, 5, 30))
    ours, flax_dense = Dense(7), nn.Dense(7, precision=PRECISION)
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, flax_dense.init(jax.random.key(1), x))
    np.testing.assert_array_equal(ours.apply(variables, x), flax_dense.apply(variables, x))
