import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp.models import BatchNorm1d
from jaxmlp.stages import STAGES, make_model
from jaxmlp.train import TrainConfig, create_train_state, cross_entropy


def test_lecture_batchnorm_train_eval_and_running_update():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(32, 5)).astype(np.float32)
    bn = BatchNorm1d("lecture")
    variables = bn.init(jax.random.key(0), x, train=False)
    assert jnp.all(variables["batch_stats"]["mean"] == 0)
    assert jnp.all(variables["batch_stats"]["std"] == 1)
    params = {"scale": jnp.full(5, 1.5), "bias": jnp.full(5, -0.5)}
    y, upd = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                      train=True, mutable=["batch_stats"])
    # The lecture by hand: unbiased std, no epsilon, 0.999 old + 0.001 new.
    mean, std = x.mean(0), x.std(0, ddof=1)
    np.testing.assert_allclose(y, 1.5 * (x - mean) / std - 0.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.001 * mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["std"], 0.999 + 0.001 * std, rtol=1e-6)
    # Eval mode divides by the running std itself, whatever the batch.
    y_eval = bn.apply({"params": params, **upd}, x[:3], train=False)
    rm, rs = upd["batch_stats"]["mean"], upd["batch_stats"]["std"]
    np.testing.assert_allclose(y_eval, 1.5 * (x[:3] - rm) / rs - 0.5, rtol=1e-5)
    # Immutable batch_stats in training mode: normalises but does not update.
    y2 = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True)
    np.testing.assert_allclose(y2, y, rtol=1e-6)


def test_unknown_semantics_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown batch-norm semantics"):
        BatchNorm1d("pytorch").init(jax.random.key(0), jnp.ones((4, 2)), train=False)


@pytest.mark.parametrize("stage, n_params", [("original", 11_897), ("softmax-fix", 11_897),
                                             ("tanh-fix", 11_897), ("kaiming", 11_897),
                                             ("batchnorm", 12_097)])
def test_stage_param_counts(stage, n_params):
    model = make_model(stage, vocab_size=27)
    params = create_train_state(jax.random.key(0), model, TrainConfig()).params
    assert sum(x.size for x in jax.tree.leaves(params)) == n_params
    assert ("bias" in params["hidden"]) == (stage != "batchnorm")


def test_stage_init_scales():
    kaiming = (5 / 3) / math.sqrt(30)
    expected = {"original": (1, 1, 1, 1), "softmax-fix": (1, 1, 0.01, 0),
                "tanh-fix": (0.2, 0.01, 0.01, 0), "kaiming": (kaiming, 0.01, 0.01, 0),
                "batchnorm": (kaiming, None, 0.01, 0)}
    assert set(expected) == set(STAGES)
    for stage, (w1, b1, w2, b2) in expected.items():
        model = make_model(stage, vocab_size=27)
        p = model.init(jax.random.key(1), jnp.zeros((2, 3), jnp.int32))["params"]
        # 6,000 and 5,400 N(0, 1) draws: the sample std is within a few percent of the scale.
        np.testing.assert_allclose(np.std(p["embed"]["embedding"]), 1.0, rtol=0.15)
        np.testing.assert_allclose(np.std(p["hidden"]["kernel"]), w1, rtol=0.05)
        np.testing.assert_allclose(np.std(p["out"]["kernel"]), w2, rtol=0.05)
        if b1 is not None:
            np.testing.assert_allclose(np.std(p["hidden"]["bias"]), b1, rtol=0.3)
        if b2 == 0:
            assert np.all(p["out"]["bias"] == 0)
        else:
            assert np.std(p["out"]["bias"]) > 0.5


def test_step0_loss_original_is_confidently_wrong_fixes_are_near_uniform(names_data):
    X, Y = jnp.asarray(names_data.train.X[:3200]), jnp.asarray(names_data.train.Y[:3200])
    uniform = -math.log(1 / 27)
    for stage in STAGES:
        model = make_model(stage, vocab_size=27)
        variables = model.init(jax.random.key(0), X[:2])
        loss = float(cross_entropy(model.apply(variables, X, train=True,
                                               mutable=["batch_stats"])[0], Y))
        if stage == "original":
            assert loss > 15
        else:
            assert abs(loss - uniform) < 0.05, (stage, loss)
