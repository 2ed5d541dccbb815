"""The model protocol: a flax.linen Module of one's own, defined here, trains, checkpoints,
resumes, evaluates and samples from another directory (another process, which imports it as
`test_protocol:TinyNet`), and is diagnosed; a module missing a piece is refused naming it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxmlp as jm
from jaxmlp import checkpoint as ckpt
from jaxmlp import runs
from jaxmlp.cli import main

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
STEPS, CHUNK = 120, 40


class TinyNet(nn.Module):
    """A researcher's module: embedding, Linear, Flax's own batch norm, tanh, Linear."""

    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 6
    n_hidden: int = 16
    batchnorm: bool = True
    probes: bool = True  # False: records nothing for the diagnostics

    @nn.compact
    def __call__(self, idx, train: bool = False):  # (B, T) int32 -> (B, V)
        x = nn.Embed(self.vocab_size, self.n_embd)(idx).reshape(idx.shape[0], -1)
        x = nn.Dense(self.n_hidden, use_bias=not self.batchnorm)(x)
        if self.batchnorm:  # running statistics in batch_stats, as the protocol asks
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = jnp.tanh(x)
        if self.probes:
            self.sow("intermediates", "h", x)
            x = jm.probe_point(self, "h", x)
        return nn.Dense(self.vocab_size)(x)


class NoBlockSize(nn.Module):
    vocab_size: int = 27

    @nn.compact
    def __call__(self, idx, train: bool = False):
        return nn.Dense(self.vocab_size)(idx.astype(jnp.float32))


class NoTrainArgument(nn.Module):
    block_size: int = 3

    @nn.compact
    def __call__(self, idx):
        return nn.Dense(27)(idx.astype(jnp.float32))


class PerPosition(nn.Module):
    """Logits (B, T, V): one per position, not one per example."""

    block_size: int = 3

    @nn.compact
    def __call__(self, idx, train: bool = False):
        return nn.Embed(27, 27)(idx)


class OwnCollection(nn.Module):
    """Keeps a counter in a collection of its own, which no checkpoint would hold."""

    block_size: int = 3

    @nn.compact
    def __call__(self, idx, train: bool = False):
        calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        if train and not self.is_initializing():
            calls.value += 1
        return nn.Dense(27)(idx.astype(jnp.float32))


def config():
    return jm.TrainConfig(steps=STEPS, chunk=CHUNK, batch_size=16)


def subprocess_env(cli_env, importable: bool) -> dict:
    """cli_env, with this file's folder on PYTHONPATH when the module must be importable."""
    env = dict(cli_env)
    if importable:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
    return env


def jaxmlp_command(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "jaxmlp", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TinyNet run through plan_new_run + train_run, its data given as a relative path."""
    out = tmp_path_factory.mktemp("protocol") / "run"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the data as a user in the repository gives it: data/names.txt
    try:
        plan = jm.plan_new_run(TinyNet(), config=config(), data="data/names.txt", out=out)
    finally:
        os.chdir(cwd)
    metrics = jm.train_run(plan, progress=False, log=None)
    return out, metrics


def test_a_module_of_ones_own_trains_and_records_its_import_path(trained, names_data, capsys):
    out, metrics = trained
    spec = json.loads((out / "run.json").read_text())
    assert spec["stage"] == "TinyNet"
    assert spec["model"] == {"class": "test_protocol:TinyNet", "vocab_size": 27,
                             "block_size": 3, "n_embd": 6, "n_hidden": 16, "batchnorm": True,
                             "probes": True}
    assert spec["data"] == str(ROOT / "data" / "names.txt")  # absolute: usable from anywhere
    for name in ("checkpoint.msgpack", "losses.npy", "loss.png", "metrics.json"):
        assert (out / name).is_file(), name
    loaded_spec, state = jm.load_run(out)
    assert type(loaded_spec.model) is TinyNet and int(state.step) == STEPS
    assert set(state.batch_stats["BatchNorm_0"]) == {"mean", "var"}
    # metrics.json holds the model's own losses on the splits
    losses = jm.split_losses(loaded_spec.model, state.variables, names_data)
    assert abs(losses["val"] - metrics["val"]) < 1e-5 and metrics["val"] < 3.2
    # Flax's BatchNorm has no bn_momentum field: nothing to calibrate, and eval says why.
    assert "calibrated" not in metrics
    assert main(["eval", "--run", str(out), "--calibrate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TinyNet has no bn_momentum field" in err


def test_eval_and_sample_rebuild_it_in_another_process_and_directory(trained, cli_env,
                                                                    tmp_path):
    out, metrics = trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = subprocess_env(cli_env, importable=True)
    r = jaxmlp_command(["eval", "--run", str(out)], env, elsewhere)
    assert r.returncode == 0, r.stderr
    got = dict(line.split() for line in r.stdout.splitlines())
    assert set(got) == {"train", "val", "test"}
    for split, value in got.items():
        assert abs(float(value) - metrics[split]) < 1e-4, split
    r = jaxmlp_command(["sample", "--run", str(out), "-n", "5"], env, elsewhere)
    assert r.returncode == 0, r.stderr
    names = r.stdout.splitlines()
    assert len(names) == 5 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyz") for n in names)
    assert names == jm.sample_run(out, num=5, seed=0)  # the same names as in this process

    # Without this folder on its path, the other process says exactly what it cannot import.
    r = jaxmlp_command(["eval", "--run", str(out)], subprocess_env(cli_env, False), elsewhere)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("jaxmlp eval: error: run.json names the model class TinyNet "
                               "from module test_protocol, which cannot be imported here")
    assert "PYTHONPATH" in r.stderr and "Traceback" not in r.stderr


def test_a_run_whose_class_is_gone_says_so_in_one_line(trained, tmp_path, capsys):
    out, _ = trained
    for path, says in [("test_protocol:Gone", "has no such flax Module here"),
                       ("no_such_package.models:TinyNet", "cannot be imported here")]:
        run = tmp_path / path.replace(":", "-")
        run.mkdir()
        for name in ("run.json", "checkpoint.msgpack"):
            (run / name).write_bytes((out / name).read_bytes())
        spec = json.loads((run / "run.json").read_text())
        spec["model"]["class"] = path
        (run / "run.json").write_text(json.dumps(spec))
        for command in (["eval", "--run", str(run)], ["sample", "--run", str(run)],
                        ["train", "--resume", str(run)]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err and "corrupted" not in err, err
        with pytest.raises(jm.RunError, match=says):
            jm.load_run(run)


def test_it_resumes_exactly_after_an_interruption(trained, tmp_path, monkeypatch):
    out, _ = trained
    real_save, saves = ckpt.save_checkpoint, []

    def save_then_stop(*args, **kwargs):  # Ctrl-C right after the checkpoint of step CHUNK
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    run = tmp_path / "run"
    with pytest.raises(runs.Interrupted):
        jm.train_run(jm.plan_new_run(TinyNet(), config=config(), out=run), progress=False,
                     log=None)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(run).step == CHUNK
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    for name in (ckpt.CKPT_FILE, ckpt.LOSSES_FILE, ckpt.SPEC_FILE):
        assert (run / name).read_bytes() == (out / name).read_bytes(), name


def test_it_is_diagnosed(trained, names_data):
    out, _ = trained
    spec, state = jm.load_run(out)
    d = jm.diagnose(state, *names_data.train, spec.model, spec.train, steps=20, every=5,
                    stats_every=10)
    for p in (d.init, d.final):  # probe's output, of the minibatch before and after
        assert set(p["activations"]) == set(p["gradients"]) == {"h"}
        assert p["activations"]["h"]["hist"].shape == (50,)
        assert p["activations"]["h"]["values"].shape == (16, 16)  # (B, n_hidden)
        assert 0 <= p["activations"]["h"]["saturated"] <= 1
        assert {"Dense_0/kernel", "Dense_1/kernel"} <= set(p["weights"])
    assert (d.trace["step"] - STEPS).tolist() == [4, 9, 14, 19]  # every 5th, from step 120
    assert d.trace["losses"].shape == (20,) and np.isfinite(d.trace["losses"]).all()
    assert d.trace["has_stats"].tolist() == [False, True, False, True]  # steps 130 and 140
    assert d.trace["stats"]["activations"]["h"]["std"].shape == (4,)
    assert set(d.trace["update_ratios"]) >= {"Dense_0/kernel", "Dense_1/kernel"}
    assert int(d.state.step) == STEPS + 20


def test_a_module_without_probe_points_is_told_how_to_add_them(names_data):
    model = TinyNet(probes=False)
    config_ = config()
    state = jm.create_train_state(jax.random.key(0), model, config_)
    X, Y = names_data.train.X[:32], names_data.train.Y[:32]
    for call in (lambda: jm.probe(state.variables, X, Y, model=model),
                 lambda: jm.diagnose(state, *names_data.train, model, config_, steps=4)):
        with pytest.raises(jm.ConfigError) as e:
            call()
        assert "TinyNet records no activations to diagnose" in str(e.value)
        assert "self.sow('intermediates', name, x)" in str(e.value)
        assert "jaxmlp.probe_point(self, name, x)" in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("model, says", [
    (NoBlockSize(), "NoBlockSize needs a positive int field block_size"),
    (TinyNet(block_size=0), "TinyNet needs a positive int field block_size"),
    (NoTrainArgument(), "its __call__ must take (idx, train) and return logits (B, V)"),
    (PerPosition(), "it must return float logits (2, V)"),
    (OwnCollection(), "keeps state in the collection 'counters'"),
    (TinyNet(vocab_size=30), "returns 30 logits per example but the names file has 27 tokens"),
])
def test_a_module_missing_a_piece_is_refused_naming_it(model, says, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(jm.ConfigError) as e:
        jm.plan_new_run(model, config=config(), out=out)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists()
    if "names file" not in says:  # without the data, check_model knows no vocabulary
        with pytest.raises(jm.ConfigError) as e:
            jm.check_model(model)
        assert says in str(e.value)


def test_a_module_run_json_cannot_name_is_refused_before_training(tmp_path):
    class Local(TinyNet):  # defined in a function: no import path
        pass

    with pytest.raises(jm.ConfigError, match="defined inside a function"):
        jm.plan_new_run(Local(), config=config(), out=tmp_path / "a")
    with pytest.raises(jm.ConfigError, match="a field of the stages' models"):
        jm.plan_new_run(TinyNet(), n_hidden=8, out=tmp_path / "b")
    assert not any(tmp_path.iterdir())
