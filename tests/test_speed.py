"""The fused loop's speed-ups keep the numbers: chunk-drawn minibatches, batch norm's JVP rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp.models import BN_PRESETS, BatchNorm1d, batch_norm_train
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
