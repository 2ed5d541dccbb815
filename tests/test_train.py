import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp.errors import ConfigError, DivergenceError
from jaxmlp.evaluate import calibrate, sample_names, split_losses
from jaxmlp.stages import Schedule, make_model
from jaxmlp.train import TrainConfig, create_train_state, fit, make_schedule


def test_schedule_steps_down_exactly():
    sched = make_schedule(Schedule((0.1, 0.01), (100_000,)))
    assert float(sched(0)) == np.float32(0.1)
    assert float(sched(99_999)) == np.float32(0.1)
    assert float(sched(100_000)) == np.float32(0.01)  # exact, not 0.1 * 0.1
    three = make_schedule(Schedule((1.0, 0.5, 0.25), (10, 20)))
    assert [float(three(s)) for s in (9, 10, 19, 20)] == [1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive"),
    (dict(batch_size=-3), "batch size must be a positive"),
    (dict(schedule=Schedule((0.1, -0.01), (5,))), "learning rates must be positive"),
    (dict(schedule=Schedule((0.1, 0.01, 0.001), (20, 10))), "boundaries must be positive and"),
    (dict(schedule=Schedule((0.1,), (10,))), "one more learning rate"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs).validate()


def test_batch_size_one_with_batchnorm_is_refused():
    TrainConfig(batch_size=1).validate(batchnorm=False)
    with pytest.raises(ConfigError, match="batch size 1"):
        TrainConfig(batch_size=1).validate(batchnorm=True)


@pytest.fixture(scope="module")
def short_run(names_data):
    model = make_model("batchnorm", vocab_size=27, n_hidden=64)
    config = TrainConfig(steps=1500, chunk=500)
    state = create_train_state(jax.random.key(0), model, config)
    return model, config, state, fit(state, *names_data.train, model, config, log=None,
                                     progress=False)


def test_short_run_lowers_the_loss_and_updates_running_stats(short_run, names_data):
    model, _config, _state0, result = short_run
    assert result.losses.shape == (1500,) and np.isfinite(result.losses).all()
    assert int(result.state.step) == 1500
    assert result.losses[-200:].mean() < result.losses[:50].mean() - 0.5
    variables = result.state.variables
    losses = split_losses(model, variables, names_data)
    assert set(losses) == {"train", "val", "test"} and losses["val"] < 2.8
    assert not np.allclose(result.state.batch_stats["bn"]["mean"], 0)
    # Calibrated statistics are the full training set's own.
    cal = calibrate(variables, jnp.asarray(names_data.train.X), model=model)
    assert abs(split_losses(model, cal, names_data)["train"] - losses["train"]) < 0.1


def test_chunking_does_not_change_the_run(short_run, names_data):
    model, config, _state0, result = short_run
    state = create_train_state(jax.random.key(0), model, config)
    other = fit(state, *names_data.train, model, TrainConfig(steps=1500, chunk=700), log=None,
                progress=False)
    np.testing.assert_array_equal(other.losses, result.losses)


def test_given_batch_stream_is_used(names_data):
    model = make_model("kaiming", vocab_size=27, n_hidden=32)
    config = TrainConfig(steps=20, chunk=20)
    X, Y = names_data.train
    ix = np.tile(np.arange(32, dtype=np.int32), (20, 1))  # always the same 32 examples
    r = fit(create_train_state(jax.random.key(0), model, config), X, Y, model, config,
            batch_ix=ix, log=None, progress=False)
    assert r.losses[-1] < r.losses[0] - 0.3  # memorising one minibatch


def test_divergence_names_the_step(names_data):
    model = make_model("original", vocab_size=27, n_hidden=32)
    config = TrainConfig(steps=200, chunk=100, schedule=Schedule((1e38,), ()))
    with pytest.raises(DivergenceError, match=r"at step \d+; lower the learning rate"):
        fit(create_train_state(jax.random.key(0), model, config), *names_data.train, model,
            config, log=None, progress=False)


def test_samples_decode_and_depend_on_the_key(short_run, names_data):
    model, _, _, result = short_run
    variables = result.state.variables
    a = sample_names(model, variables, names_data.vocab, jax.random.key(1), num=8)
    b = sample_names(model, variables, names_data.vocab, jax.random.key(1), num=8)
    c = sample_names(model, variables, names_data.vocab, jax.random.key(2), num=8)
    assert a == b and a != c and len(a) == 8
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz") for n in a)
    assert sum(len(n) for n in a) > 8
