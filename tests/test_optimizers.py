"""Any optax optimizer and schedule, trained, checkpointed and resumed exactly; hyperparameters
as data: one compiled program for a learning-rate (or weight-decay) grid, run by run equal to
the same runs trained alone."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxmlp as jm
from jaxmlp import checkpoint as ckpt
from jaxmlp.cli import main
from jaxmlp.devices import vmap_width

ROOT = Path(__file__).resolve().parent.parent
STEPS, CHUNK = 240, 80


def make_tx():
    """The researcher's optimizer: clipping, AdamW, warmup then cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.02, warmup_steps=40, decay_steps=STEPS)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-3))


@pytest.fixture(scope="module")
def small_model(names_data):
    return jm.make_model("batchnorm", names_data.vocab.size, n_hidden=24)


def test_any_optax_chain_trains_through_fit_and_the_state_stays_usable(small_model, names_data):
    config = jm.TrainConfig(steps=STEPS, chunk=CHUNK, optimizer=make_tx())
    state = jm.create_train_state(jax.random.key(0), small_model, config)
    before = jax.tree.map(np.array, state.params)
    a = jm.fit(state, *names_data.train, small_model, config, log=None, progress=False)
    assert a.losses[-40:].mean() < a.losses[:10].mean() - 0.4
    # fit copied the state first: the caller's is whole and starts a second, equal run.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    b = jm.fit(state, *names_data.train, small_model, config, log=None, progress=False)
    np.testing.assert_array_equal(a.losses, b.losses)
    # train_chunk still donates what it is given, for those who ask.
    X, Y = map(jax.numpy.asarray, names_data.train)
    jm.train_chunk(state, X, Y, None, model=small_model, config=config, num_steps=2)
    assert state.step.is_deleted()


def test_a_preset_takes_any_optax_schedule(small_model, names_data):
    schedule = optax.cosine_decay_schedule(0.1, STEPS)
    preset = jm.TrainConfig(steps=STEPS, chunk=STEPS, optimizer="sgd", schedule=schedule)
    given = jm.TrainConfig(steps=STEPS, chunk=STEPS, optimizer=optax.sgd(schedule))
    runs = [jm.fit(jm.create_train_state(jax.random.key(1), small_model, c), *names_data.train,
                   small_model, c, log=None, progress=False) for c in (preset, given)]
    np.testing.assert_array_equal(runs[0].losses, runs[1].losses)
    # A number is a constant rate; anything else is refused in one line.
    assert jm.TrainConfig(schedule=0.05).schedule == jm.Schedule((0.05,), ())
    with pytest.raises(jm.ConfigError, match=r"optax\.GradientTransformation"):
        jm.TrainConfig(optimizer=object()).validate()


# Trains a run with the optimizer of make_tx through the API, dying halfway through writing its
# checkpoint number argv[3] (after the one of step 0): it tells the test (argv[2]) and waits.
KILLED = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import jaxmlp as jm, jaxmlp.checkpoint as ck
from test_optimizers import STEPS, CHUNK, make_tx

out, marker, die_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
real_write, writes = ck.write_atomic, []

def write_atomic(path, data):
    if Path(path).name == ck.CKPT_FILE:
        writes.append(path)
        if len(writes) == die_at:
            Path(path).with_name(f".{ck.CKPT_FILE}.tmp").write_bytes(data[: len(data) // 2])
            marker.write_text("half written")
            time.sleep(600)
    real_write(path, data)

ck.write_atomic = write_atomic
config = jm.TrainConfig(steps=STEPS, chunk=CHUNK, optimizer=make_tx())
jm.train_run(jm.plan_new_run("kaiming", n_hidden=24, config=config, out=out), progress=False)
"""


def test_a_custom_optimizer_run_killed_and_resumed_equals_an_uninterrupted_one(
        tmp_path, cli_env, capsys, sigkill_at_marker):
    whole, out, marker = tmp_path / "whole", tmp_path / "run", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(out), str(marker), "3",
                              str(Path(__file__).parent)], env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # meanwhile, the same run uninterrupted, in this process
        config = jm.TrainConfig(steps=STEPS, chunk=CHUNK, optimizer=make_tx())
        jm.train_run(jm.plan_new_run("kaiming", n_hidden=24, config=config, out=whole),
                     progress=False, log=None)
        sigkill_at_marker(child, marker)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    spec = json.loads((out / "run.json").read_text())["train"]
    assert spec["optimizer"] == "custom" and "ScaleByAdamState" in spec["optimizer_state"]
    assert ckpt.load_checkpoint(out).step == CHUNK  # eval and sample need no optimizer

    # The command line cannot rebuild the optimizer: it says so, and how, in one line.
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "custom optimizer" in err and "optimizer=tx" in err
    # Another optimizer is refused; the run's own resumes it exactly.
    with pytest.raises(jm.RunError, match="does not match"):
        jm.plan_resumed_run(out, optimizer=optax.sgd(0.1))
    plan = jm.plan_resumed_run(out, optimizer=make_tx())
    jm.train_run(plan, progress=False, log=None)
    for name in (ckpt.CKPT_FILE, ckpt.LOSSES_FILE, ckpt.SPEC_FILE):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    a, b = (ckpt.load_checkpoint(d, optimizer=make_tx()) for d in (out, whole))
    assert type(a.state.opt_state) is type(b.state.opt_state)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(a.state.opt_state),
                 jax.tree.leaves(b.state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)
    m = [json.loads((d / ckpt.METRICS_FILE).read_text()) for d in (out, whole)]
    assert [x["val"] for x in m] == [m[1]["val"]] * 2 and m[0]["resumed_from_step"] == CHUNK


def test_a_preset_run_refuses_an_optimizer_on_resume(tmp_path):
    plan = jm.plan_new_run("kaiming", n_hidden=8, config=jm.TrainConfig(steps=10, chunk=10),
                           out=tmp_path / "r")
    plan.workdir.mkdir()
    ckpt.write_json(plan.workdir / ckpt.SPEC_FILE, plan.spec.to_json())
    with pytest.raises(jm.RunError, match="resume it without optimizer="):
        jm.plan_resumed_run(tmp_path / "r", optimizer=make_tx())


# ------------------------------------------------------------------ hyperparameters as data


def test_a_weight_decay_and_lr_grid_equals_the_plain_optimizer_run_alone(small_model, names_data):
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
    config = jm.TrainConfig(steps=120, chunk=60, optimizer=tx)
    states, rows = jm.grid_states([0, 1], small_model, config, learning_rate=[3e-3, 1e-2],
                                  weight_decay=[0.0, 0.1])
    assert len(rows) == 8 and rows[1] == {"learning_rate": 3e-3, "weight_decay": 0.0, "seed": 1}
    many = jm.train_many(states, *names_data.train, small_model, config)
    for i in (1, 6):  # two of the eight, each trained alone with the plain optimizer
        r = rows[i]
        alone = jm.TrainConfig(steps=120, chunk=120, optimizer=optax.adamw(
            r["learning_rate"], weight_decay=r["weight_decay"]))
        one = jm.fit(jm.create_train_state(jax.random.key(r["seed"]), small_model, alone),
                     *names_data.train, small_model, alone, log=None, progress=False)
        np.testing.assert_allclose(many.losses[i], one.losses, rtol=1e-5)
        params = jm.unstack_state(many.states, i).params
        # Adam divides by sqrt(v): rounding in a tiny gradient moves a parameter near zero by
        # ~1e-6 over 120 steps (an absolute error), so atol, not rtol, bounds those.
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                     params, one.state.params)
    with pytest.raises(jm.ConfigError, match="no injected hyperparameter 'momentum'"):
        jm.set_hyperparams(states, momentum=0.9)


def test_cli_lr_sweep_equals_the_runs_trained_one_at_a_time(tmp_path, capsys, names_data):
    out = tmp_path / "sweep"
    assert main(["sweep", "--stages", "kaiming", "--seeds", "2", "--lr", "0.05,0.2", "--steps",
                 "150", "--out", str(out), "--quiet"]) == 0
    assert "2 seeds x 2 learning rates each, 4 runs in one program" in capsys.readouterr().out
    r = json.loads((out / "sweep.json").read_text())
    assert list(r) == ["kaiming lr=0.05", "kaiming lr=0.2"]
    model = jm.make_model("kaiming", names_data.vocab.size)
    for e in r.values():
        assert e["stage"] == "kaiming" and e["hyperparams"]["lr"] == e["lr"]
        assert e["hyperparams"]["learning_rates"] == [e["lr"], e["lr"] / 10]
        assert len(e["val"]) == 2 and abs(e["mean"]["val"] - np.mean(e["val"])) < 1e-9
        assert e["std"]["val"] > 0 and e["ci95"]["val"] > 0
        # The same run through `jaxmlp train --stage kaiming --lr LR,LR/10 --seed 1`'s code.
        config = jm.TrainConfig(steps=150, chunk=150,
                                schedule=jm.Schedule((e["lr"], e["lr"] / 10), (100_000,)))
        one = jm.fit(jm.create_train_state(jax.random.key(1), model, config),
                     *names_data.train, model, config, log=None, progress=False)
        val = jm.split_losses(model, one.state.variables, names_data, ("val",))["val"]
        assert abs(e["val"][1] - val) < 1e-5
    assert r["kaiming lr=0.2"]["val"] != r["kaiming lr=0.05"]["val"]
    md = (out / "sweep.md").read_text()
    assert "| kaiming | 0.05 | 2 |" in md and "| kaiming | 0.2 | 2 |" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sweep", "--lr", "0.1,-1", "--out", str(tmp_path / "bad")]) == 2
    assert "learning rates must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_vmap_width_per_platform_and_chosen(small_model, names_data):
    assert vmap_width("cpu", 16) == 4 and vmap_width("cpu", 2) == 2
    assert vmap_width("gpu", 16) == 16 and vmap_width("tpu", 5) == 5
    assert vmap_width("gpu", 16, width=2) == 2
    config = jm.TrainConfig(steps=40, chunk=40)
    states = jm.seed_states(range(3), small_model, config)
    runs = [jm.train_many(states, *names_data.train, small_model, config, vmap_width=w,
                          devices=jax.devices()[:1]) for w in (1, 2, None)]
    for r in runs[1:]:
        np.testing.assert_allclose(r.losses, runs[0].losses, rtol=1e-6)
    with pytest.raises(jm.ConfigError, match="--vmap-width must be a positive integer"):
        jm.train_many(states, *names_data.train, small_model, config, vmap_width=0)
