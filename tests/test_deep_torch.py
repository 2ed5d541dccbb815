"""The deep network against the lecture's PyTorch code: same tensors, same stream, same run."""

import json

import jax
import numpy as np
import pytest

from jaxmlp import torch_bridge as tb
from jaxmlp.cli import main
from jaxmlp.errors import ConfigError
from jaxmlp.models import DeepMLP
from jaxmlp.stages import get_stage, make_model
from jaxmlp.train import TrainConfig, fit

STEPS = 200


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def lecture_deep_tensors(torch, stage):
    """The lecture's cells for the deep network, transcribed (no jaxmlp code involved)."""
    g = torch.Generator().manual_seed(2147483647)
    n_embd, block_size, n_hidden, vocab_size = 10, 3, 100, 27
    C = torch.randn((vocab_size, n_embd), generator=g)
    sizes = [(n_embd * block_size, n_hidden)] + [(n_hidden, n_hidden)] * 4
    sizes.append((n_hidden, vocab_size))
    t, i = {"C": C}, 0
    for fan_in, fan_out in sizes:
        t[f"layers.{i}.weight"] = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
        if stage == "deep":
            t |= {f"layers.{i + 1}.gamma": torch.ones(fan_out),
                  f"layers.{i + 1}.beta": torch.zeros(fan_out),
                  f"layers.{i + 1}.running_mean": torch.zeros(fan_out),
                  f"layers.{i + 1}.running_var": torch.ones(fan_out)}
            i += 3
        else:
            t[f"layers.{i}.bias"] = torch.zeros(fan_out)
            i += 2
    with torch.no_grad():
        if stage == "deep":
            t["layers.16.gamma"] *= 0.1  # layers[-1].gamma *= 0.1
            gain, linears = 1.0, range(0, 16, 3)
        else:
            t["layers.10.weight"] *= 0.1  # layers[-1].weight *= 0.1
            gain, linears = 5 / 3, range(0, 10, 2)
        for j in linears:  # for layer in layers[:-1]: if Linear: weight *= gain
            t[f"layers.{j}.weight"] *= gain
    return t, g


@pytest.mark.parametrize("stage", ["deep", "deep-nobn"])
def test_initial_variables_are_the_lecture_tensors_exactly(torch, stage):
    expected, g_expected = lecture_deep_tensors(torch, stage)
    model = make_model(stage, vocab_size=27)
    tensors, g = tb.lecture_init(model)
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    assert torch.equal(g.get_state(), g_expected.get_state())
    state, _ = tb.lecture_train_state(model, TrainConfig(schedule=get_stage(stage).schedule))
    back = tb.variables_to_tensors(state.variables, model)  # Flax -> torch -> Flax, exactly
    for name, t in expected.items():
        assert torch.equal(back[name], t), name
    again = tb.tensors_to_variables(back, model)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, dict(state.variables)))


@pytest.fixture(scope="module")
def deep_parity(torch, names_data):
    """STEPS steps of each deep stage, JAX (fit) and PyTorch (the lecture's classes), one
    stream."""
    out = {}
    for stage in ("deep", "deep-nobn"):
        model = make_model(stage, names_data.vocab.size)
        config = TrainConfig(steps=STEPS, schedule=get_stage(stage).schedule)
        state, batch_ix = tb.lecture_stream(model, config, len(names_data.train.X))
        tensors, g = tb.lecture_init(model)
        jax_run = fit(state, *names_data.train, model, config, batch_ix=batch_ix, log=None,
                      progress=False)
        losses, trained, ud = tb.lecture_train_deep(tensors, g, *names_data.train, STEPS, model,
                                                    ud=True)
        out[stage] = model, jax_run, losses, trained, ud
    return out


@pytest.mark.parametrize("stage", ["deep", "deep-nobn"])
def test_jax_and_torch_agree_step_by_step(deep_parity, stage):
    _, jax_run, losses, _, _ = deep_parity[stage]
    np.testing.assert_allclose(jax_run.losses, losses, rtol=1e-4)
    # The step-0 loss is docs/reference.md's (the lecture's initial weights, its first batch).
    assert losses[0] == pytest.approx(get_stage(stage).reference.step0, abs=1e-4)


def test_trained_variables_and_eval_loss_agree(deep_parity, names_data):
    from jaxmlp.evaluate import eval_loss

    model, jax_run, _, trained, _ = deep_parity["deep"]
    got = tb.variables_to_tensors(jax_run.state.variables, model)
    for name, t in trained.items():  # running statistics included
        np.testing.assert_allclose(got[name].numpy(), t.reshape(got[name].shape).numpy(),
                                   rtol=2e-3, atol=2e-5, err_msg=name)
    X, Y = names_data.val.X[:2000], names_data.val.Y[:2000]
    ours = float(eval_loss(jax_run.state.variables, X, Y, model=model))
    assert ours == pytest.approx(tb.lecture_split_loss_deep(trained, X, Y, model), rel=1e-4)


def test_update_ratios_are_the_lectures_ud(deep_parity, names_data):
    """diagnostics.run_diagnosed on the torch stream records the lecture's `ud` values."""
    from jaxmlp import diagnostics as diag

    model, _, _, _, ud = deep_parity["deep"]
    config = TrainConfig(steps=STEPS, schedule=get_stage("deep").schedule)
    state, batch_ix = tb.lecture_stream(model, config, len(names_data.train.X))
    _, trace = diag.run_diagnosed(state, *names_data.train, batch_ix, model=model,
                                  config=config, num_steps=STEPS)
    ours = np.stack([trace["update_ratios"][n] for n in
                     ["embed/embedding"] + [f"linear{i}/kernel" for i in range(0, 16, 3)]], 1)
    np.testing.assert_allclose(ours, ud, atol=2e-3)


def test_models_the_lectures_code_cannot_express_are_refused(torch):
    for model in (DeepMLP(27, activation="relu"), DeepMLP(27, norm="layernorm"),
                  DeepMLP(27, bn_semantics="torch")):
        with pytest.raises(ConfigError, match="replays DeepMLP only with activation tanh"):
            tb.lecture_init(model)
    # torch.nn has no such limit: torch_module builds every DeepMLP (tests/test_torch_convert.py).
    assert type(tb.torch_module(make_model("deep", 27))).__name__ == "TorchDeepMLP"


def test_cli_train_and_diagnose_deep_on_the_torch_stream(torch, tmp_path, capsys):
    out = tmp_path / "deep"
    assert main(["train", "--stage", "deep", "--torch-stream", "--steps", "30", "--out",
                 str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["torch_stream"] and metrics["step_losses"]["0"] == pytest.approx(3.2870,
                                                                                  abs=1e-4)
    capsys.readouterr()
    diag_out = tmp_path / "diag"
    assert main(["diagnose", "--stage", "deep-nobn", "--torch-stream", "--steps", "20",
                 "--out", str(diag_out)]) == 0
    assert "the lecture's torch stream" in capsys.readouterr().out
    report = json.loads((diag_out / "diagnostics.json").read_text())
    assert report["torch_stream"] is True and report["step"] == 20
    assert len(report["update_ratios"]["linear10/kernel"]) == 20
