import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp import init
from jaxmlp.errors import ConfigError

GAIN_CASES = [(n, None) for n in init.NONLINEARITIES] + [
    ("leaky_relu", 0.2), ("leaky_relu", 0), ("leaky_relu", 1), ("leaky_relu", 3),
    ("leaky_relu", -0.5), ("leaky_relu", 0.01)]


def test_calculate_gain_equals_torch():
    torch = pytest.importorskip("torch")
    for nonlinearity, param in GAIN_CASES:
        ours = init.calculate_gain(nonlinearity, param)
        theirs = torch.nn.init.calculate_gain(nonlinearity, param)
        assert abs(ours - theirs) < 1e-7, (nonlinearity, param, ours, theirs)


def test_calculate_gain_known_values():
    assert init.calculate_gain("tanh") == 5 / 3
    assert init.calculate_gain("relu") == math.sqrt(2)
    assert init.calculate_gain("selu") == 0.75
    for name in ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "sigmoid"):
        assert init.calculate_gain(name) == 1
    assert init.calculate_gain("leaky_relu") == math.sqrt(2 / (1 + 0.01**2))
    assert init.calculate_gain("leaky_relu", 1) == 1.0  # slope 1 is the identity
    assert init.calculate_gain("leaky_relu", 0) == math.sqrt(2)  # slope 0 is relu


@pytest.mark.parametrize("args, match", [
    (("gelu",), "unsupported nonlinearity 'gelu'; use one of linear"),
    (("Tanh",), "unsupported nonlinearity"),
    (("leaky_relu", "0.1"), "negative slope must be a number"),
    (("leaky_relu", True), "negative slope must be a number"),
])
def test_calculate_gain_rejects_bad_input(args, match):
    with pytest.raises(ConfigError, match=match):
        init.calculate_gain(*args)


def test_fans_follow_flax_layouts():
    assert init.compute_fans((30, 200)) == (30, 200)  # Dense kernel (in, out)
    assert init.compute_fans((3, 3, 16, 32)) == (144, 288)  # Conv kernel (h, w, in, out)
    assert init.compute_fans((200, 30), in_axis=1, out_axis=0) == (30, 200)  # torch layout
    with pytest.raises(ConfigError, match="2 or more dimensions"):
        init.compute_fans((5,))
    with pytest.raises(ConfigError, match="same axis"):
        init.compute_fans((5, 5), in_axis=0, out_axis=-2)


def test_fans_equal_torch_for_the_transposed_conv_layout():
    torch = pytest.importorskip("torch")
    w = torch.empty(32, 16, 5, 3)  # torch conv weight (out, in, h, w)
    flax_shape = (5, 3, 16, 32)
    assert init.compute_fans(flax_shape) == torch.nn.init._calculate_fan_in_and_fan_out(w)


SHAPE = (400, 1000)  # 400,000 draws: the sample std is within ~0.3% of the true one


@pytest.mark.parametrize("make, std, bound", [
    (lambda: init.kaiming_normal(), math.sqrt(2) / math.sqrt(400), None),
    (lambda: init.kaiming_normal(mode="fan_out", nonlinearity="tanh"), (5 / 3) / math.sqrt(1000),
     None),
    (lambda: init.kaiming_normal(gain=0.1), 0.1 / math.sqrt(400), None),
    (lambda: init.kaiming_normal(a=0.2, nonlinearity="leaky_relu"),
     math.sqrt(2 / 1.04) / math.sqrt(400), None),
    (lambda: init.kaiming_uniform(nonlinearity="relu"), math.sqrt(2 / 400),
     math.sqrt(6 / 400)),
    (lambda: init.kaiming_uniform(mode="fan_out", nonlinearity="linear"), 1 / math.sqrt(1000),
     math.sqrt(3 / 1000)),
    (lambda: init.xavier_normal(), math.sqrt(2 / 1400), None),
    (lambda: init.xavier_uniform(gain=5 / 3), 5 / 3 * math.sqrt(2 / 1400),
     5 / 3 * math.sqrt(6 / 1400)),
    (lambda: init.torch_linear_default(), 1 / math.sqrt(3 * 400), 1 / math.sqrt(400)),
    (lambda: init.normal(0.2), 0.2, None),
    (lambda: init.uniform(0.5), 0.5 / math.sqrt(3), 0.5),
])
def test_init_std_matches_its_formula(make, std, bound):
    w = np.asarray(make()(jax.random.key(0), SHAPE), np.float64)
    assert w.shape == SHAPE and w.dtype == np.float64
    assert abs(w.mean()) < 0.01 * std
    np.testing.assert_allclose(w.std(), std, rtol=0.01)
    if bound is not None:  # uniform: fills its interval up to the bound, never beyond
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.999 * bound


def test_torch_linear_default_bias_and_dtype():
    b = init.torch_linear_default(fan_in=400)(jax.random.key(1), (100_000,), jnp.bfloat16)
    assert b.dtype == jnp.bfloat16
    assert float(jnp.abs(b.astype(jnp.float32)).max()) <= 1 / math.sqrt(400) * 1.004
    with pytest.raises(ConfigError, match="pass fan_in explicitly"):
        init.torch_linear_default()(jax.random.key(1), (10,))
    with pytest.raises(ConfigError, match="fan_in must be a positive integer"):
        init.torch_linear_default(fan_in=0)


def test_bad_mode_is_refused():
    with pytest.raises(ConfigError, match="unknown mode 'fan_avg'; use fan_in or fan_out"):
        init.kaiming_normal(mode="fan_avg")


def _two_layer_grads(w1_init, w2_init):
    """Gradients of a 4 -> 8 -> 3 tanh MLP's loss with respect to both kernels."""
    k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    W1, W2 = w1_init(k1, (4, 8)), w2_init(k2, (8, 3))
    x = jax.random.normal(kx, (16, 4))
    y = jnp.arange(16) % 3

    def loss(W1, W2):
        logits = jnp.tanh(x @ W1) @ W2
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(W1, W2)


def test_zeros_give_the_hidden_layer_no_gradient():
    g1, g2 = _two_layer_grads(init.zeros, init.zeros)
    assert np.abs(np.asarray(g1)).max() == 0 and np.abs(np.asarray(g2)).max() == 0  # stuck
    g1, g2 = _two_layer_grads(init.kaiming_normal(nonlinearity="tanh"), init.zeros)
    assert np.abs(np.asarray(g2)).max() > 0  # the output layer learns ...
    assert np.abs(np.asarray(g1)).max() == 0  # ... but W2 = 0 passes nothing back


def test_constant_init_keeps_every_hidden_unit_identical():
    g1, _ = _two_layer_grads(init.constant(0.3), init.constant(0.3))
    g1 = np.asarray(g1)
    assert np.abs(g1).max() > 0  # the units learn ...
    np.testing.assert_array_equal(g1, np.repeat(g1[:, :1], 8, axis=1))  # ... all alike
