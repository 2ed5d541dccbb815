"""Sweeps: one vmapped, sharded program gives what separate runs give."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp.cli import main
from jaxmlp.stages import Schedule, make_model
from jaxmlp.sweep import (
    seed_states,
    split_losses_many,
    summarize,
    t975,
    train_many,
    unstack_state,
)
from jaxmlp.train import TrainConfig, create_train_state, train_chunk

ROOT = Path(__file__).resolve().parent.parent
STEPS = 150


def single_run(state, data, model, config, batch_ix=None):
    """One run, unbatched: the compiled loop `fit` calls, over all steps at once."""
    ix = None if batch_ix is None else jnp.asarray(batch_ix)
    return train_chunk(state, *map(jnp.asarray, data.train), ix, model=model, config=config,
                       num_steps=config.steps)


def assert_same_run(many_losses, many_state, single):
    state, losses = single
    np.testing.assert_allclose(many_losses, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(many_state.params), jax.tree.leaves(state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def seed_sweep(names_data):
    model = make_model("batchnorm", names_data.vocab.size, n_hidden=32)
    config = TrainConfig(steps=STEPS, chunk=STEPS // 2)  # two chunks
    return model, config, train_many(seed_states([0, 1, 2], model, config), *names_data.train,
                                     model, config)


def test_a_seed_sweep_equals_separate_runs(seed_sweep, names_data):
    model, config, many = seed_sweep
    assert many.losses.shape == (3, STEPS) and not many.diverged.any()
    assert len({float(x) for x in many.losses[:, 0]}) == 3  # the seeds differ
    for i, seed in enumerate([0, 1, 2]):
        state = create_train_state(jax.random.key(seed), model, config)  # `jaxmlp train --seed`
        assert_same_run(many.losses[i], unstack_state(many.states, i),
                        single_run(state, names_data, model, config))
    # Evaluation of the stacked runs equals evaluating each.
    from jaxmlp.evaluate import split_losses

    losses = split_losses_many(model, many.states, names_data, splits=("val",))
    for i in range(3):
        one = split_losses(model, unstack_state(many.states, i).variables, names_data, ("val",))
        assert abs(losses["val"][i] - one["val"]) < 1e-5


def test_a_hyperparameter_sweep_equals_separate_runs(names_data):
    model = make_model("kaiming", names_data.vocab.size, n_hidden=32)
    config = TrainConfig(steps=STEPS, chunk=STEPS)
    key = jax.random.key(3)
    # Three runs from one key that differ in the initial W1 scale (vmapped through the model's
    # initialiser) and in the learning rate (a multiplier carried as data).
    scales, factors = jnp.array([0.1, 0.3, 1.0]), jnp.array([1.0, 0.5, 2.0])
    states = jax.jit(jax.vmap(lambda s: create_train_state(key, model.copy(w1_scale=s), config)))(
        scales)
    many = train_many(states, *names_data.train, model, config, lr_scale=factors)
    assert len({float(x) for x in many.losses[:, -1]}) == 3
    X, Y = map(jnp.asarray, names_data.train)
    for i in range(3):
        # The scale only shapes the initial draw: the training program is the model's.
        start = create_train_state(key, model.copy(w1_scale=float(scales[i])), config)
        assert_same_run(many.losses[i], unstack_state(many.states, i),
                        train_chunk(start, X, Y, None, model=model, config=config,
                                    num_steps=STEPS, lr_scale=factors[i]))
    # A multiplier of 2 is the schedule doubled (powers of two: lr * c is exact).
    doubled = TrainConfig(steps=STEPS, chunk=STEPS, schedule=Schedule(
        tuple(2 * lr for lr in config.schedule.learning_rates), config.schedule.boundaries))
    start = create_train_state(key, model.copy(w1_scale=1.0), doubled)
    assert_same_run(many.losses[2], unstack_state(many.states, 2),
                    single_run(start, names_data, model, doubled))


def test_a_given_minibatch_stream_is_used_by_every_run(seed_sweep, names_data):
    model, config, _ = seed_sweep
    n = len(names_data.train.Y)
    ix = np.random.default_rng(0).integers(0, n, (config.steps, 32), dtype=np.int32)
    states = seed_states([0, 1, 2], model, config)
    shared = train_many(states, *names_data.train, model, config, batch_ix=ix)
    per_run = train_many(states, *names_data.train, model, config,
                         batch_ix=np.stack([ix, ix[::-1], ix]))
    np.testing.assert_allclose(shared.losses[[0, 2]], per_run.losses[[0, 2]], rtol=1e-6)
    assert np.abs(shared.losses[1] - per_run.losses[1]).max() > 1e-3  # its own stream
    _, one = single_run(create_train_state(jax.random.key(1), model, config), names_data, model,
                        config, batch_ix=ix)
    np.testing.assert_allclose(shared.losses[1], one, rtol=1e-6)


SHARDED = textwrap.dedent("""
    import json, jax, numpy as np
    from jaxmlp.data import load_dataset
    from jaxmlp.stages import make_model
    from jaxmlp.sweep import seed_states, train_many
    from jaxmlp.train import TrainConfig
    data = load_dataset()
    model = make_model("batchnorm", data.vocab.size, n_hidden=16)
    config = TrainConfig(steps=40, chunk=40)
    states = seed_states(range(6), model, config)  # 6 runs: padded to 8 on 4 devices
    a = train_many(states, *data.train, model, config)
    b = train_many(states, *data.train, model, config, devices=jax.devices()[:1])
    leaves = [(np.asarray(x), np.asarray(y)) for x, y in
              zip(jax.tree.leaves(a.states.params), jax.tree.leaves(b.states.params))]
    print(json.dumps({"devices": [a.num_devices, b.num_devices], "shape": a.losses.shape,
                      "loss": float(np.max(np.abs(a.losses - b.losses) / b.losses)),
                      "params": max(float(np.max(np.abs(x - y))) for x, y in leaves)}))
""")


def test_sharded_over_four_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == [4, 1] and r["shape"] == [6, 40]
    assert r["loss"] < 1e-6 and r["params"] < 1e-6


def test_summary_statistics():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert abs(s["ci95"] - 4.3027 / np.sqrt(3)) < 1e-9
    assert summarize([2.5]) == {"mean": 2.5, "std": None, "ci95": None, "n": 1}
    assert summarize([1.0, float("nan"), 3.0])["n"] == 2  # a diverged run is left out
    for df, t in ((1, 12.7062), (30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert abs(t975(df) - t) < 2e-4


def test_cli_sweep_writes_json_markdown_and_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    # Two stages that differ only in their initial scales: one batch of 4 runs, one program.
    assert main(["sweep", "--stages", "tanh-fix,kaiming", "--seeds", "2", "--steps", "200",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "tanh-fix, kaiming: 2 seeds each, 4 runs in one program" in printed
    r = json.loads((out / "sweep.json").read_text())
    assert list(r) == ["tanh-fix", "kaiming"]
    for e in r.values():
        assert e["seeds"] == [0, 1] and e["steps"] == 200
        for split in ("train", "val", "test"):
            assert len(e[split]) == 2 and all(2.0 < x < 3.3 for x in e[split])
            assert abs(e["mean"][split] - np.mean(e[split])) < 1e-9
            assert abs(e["std"][split] - np.std(e[split], ddof=1)) < 1e-9
            assert e["ci95"][split] > 0
    assert r["tanh-fix"]["pytorch"]["val"] == 2.1027 and r["kaiming"]["pytorch"]["val"] == 2.1070
    # Each stage keeps its own initialisation: tanh-fix's W1 is 0.2 * N(0,1), kaiming's 0.30.
    assert r["tanh-fix"]["train"] != r["kaiming"]["train"]
    md = (out / "sweep.md").read_text()
    assert "| kaiming | 2 |" in md and "2.1070" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing sweep is not overwritten without --force.
    assert main(["sweep", "--stages", "kaiming", "--seeds", "1", "--steps", "10", "--out",
                 str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--stages", "kaiming,resnet"], "unknown stage 'resnet'"),
    (["--seeds", "0"], "--seeds must be a positive"),
    (["--steps", "0"], "--steps must be a positive"),
    (["--cpu-devices", "0"], "--cpu-devices must be a positive"),
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id must"),
])
def test_cli_sweep_bad_input(argv, match, tmp_path, capsys):
    assert main(["sweep", *argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err
    assert not (tmp_path / "s").exists()
