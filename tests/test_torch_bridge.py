"""The torch bridge: the lecture's exact init and stream, conversions, step-by-step parity."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp import torch_bridge as tb
from jaxmlp.cli import main
from jaxmlp.errors import ConfigError, JaxmlpError
from jaxmlp.stages import STAGES, make_model
from jaxmlp.train import TrainConfig, fit


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    return torch


def lecture_tensors(torch, stage):
    """The lecture's init cells, transcribed per stage (no jaxmlp code involved)."""
    g = torch.Generator().manual_seed(2147483647)
    n_embd, block_size, n_hidden, vocab_size = 10, 3, 200, 27
    C = torch.randn((vocab_size, n_embd), generator=g)
    w1 = {"original": 1, "softmax-fix": 1, "tanh-fix": 0.2}
    if stage in w1:
        W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * w1[stage]
    else:
        W1 = (torch.randn((n_embd * block_size, n_hidden), generator=g)
              * (5 / 3) / ((n_embd * block_size) ** 0.5))
    t = {"C": C, "W1": W1}
    if stage != "batchnorm":
        t["b1"] = torch.randn(n_hidden, generator=g) * (1 if stage in ("original",
                                                                        "softmax-fix") else 0.01)
    t["W2"] = torch.randn((n_hidden, vocab_size), generator=g) * (1 if stage == "original"
                                                                  else 0.01)
    t["b2"] = torch.randn(vocab_size, generator=g) * (1 if stage == "original" else 0)
    if stage == "batchnorm":
        t |= {"bngain": torch.ones((1, n_hidden)), "bnbias": torch.zeros((1, n_hidden)),
              "bnmean_running": torch.zeros((1, n_hidden)),
              "bnstd_running": torch.ones((1, n_hidden))}
    return t, g


@pytest.mark.parametrize("stage", list(STAGES))
def test_initial_variables_are_the_lecture_tensors_exactly(torch, stage):
    expected, g_expected = lecture_tensors(torch, stage)
    model = make_model(stage, vocab_size=27)
    state, g = tb.lecture_train_state(model, TrainConfig())
    got = tb.variables_to_tensors(state.variables, model)
    assert list(got) == list(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    # The generator is left where the lecture's loop starts drawing.
    assert torch.equal(g.get_state(), g_expected.get_state())
    p = state.params
    assert np.array_equal(p["hidden"]["kernel"], expected["W1"].numpy())  # (in, out) as W1
    assert np.array_equal(p["embed"]["embedding"], expected["C"].numpy())


def test_stream_equals_per_step_randint(torch):
    _, g = tb.lecture_init(make_model("batchnorm", vocab_size=27))
    state = g.get_state()
    ix = tb.lecture_batches(g, 182_625, 3000)
    assert ix.dtype == np.int32 and ix.shape == (3000, 32)
    g2 = torch.Generator()
    g2.set_state(state)
    per_step = np.stack([torch.randint(0, 182_625, (32,), generator=g2).numpy()
                         for _ in range(3000)])
    assert np.array_equal(ix, per_step)
    assert torch.equal(g.get_state(), g2.get_state())  # the generator moved on the same


PARITY_STEPS = {"batchnorm": 300, "kaiming": 300, "original": 20}


@pytest.fixture(scope="module")
def parity_runs(torch, names_data):
    """JAX (fit with the lecture stream) and the PyTorch lecture loop, from the same start."""
    runs = {}
    for stage, steps in PARITY_STEPS.items():
        model = make_model(stage, vocab_size=27)
        config = TrainConfig(steps=steps, chunk=steps)
        state, batch_ix = tb.lecture_stream(model, config, len(names_data.train.X))
        jax_run = fit(state, *names_data.train, model, config, batch_ix=batch_ix, log=None,
                      progress=False)
        tensors, g = tb.lecture_init(model)
        torch_losses, torch_tensors = tb.lecture_train(tensors, g, *names_data.train, steps)
        runs[stage] = model, jax_run, torch_losses, torch_tensors
    return runs


@pytest.mark.parametrize("stage", list(PARITY_STEPS))
def test_jax_and_torch_agree_step_by_step(parity_runs, stage):
    model, jax_run, torch_losses, torch_tensors = parity_runs[stage]
    assert jax_run.losses.shape == torch_losses.shape == (PARITY_STEPS[stage],)
    np.testing.assert_allclose(jax_run.losses, torch_losses, rtol=1e-4)
    # Same start: step 0 agrees to float rounding, not just to 1e-4.
    np.testing.assert_allclose(jax_run.losses[0], torch_losses[0], rtol=1e-6)
    if stage != "original":  # chaotic: only its losses are compared, over fewer steps
        final = tb.variables_to_tensors(jax_run.state.variables, model)
        for name, t in torch_tensors.items():
            np.testing.assert_allclose(final[name].numpy(), t.numpy(), rtol=1e-3, atol=2e-5,
                                       err_msg=name)


def test_step0_losses_are_the_reference_figures(parity_runs):
    # docs/reference.md, "PyTorch results": loss at step 0.
    reference = {"original": 27.8817, "kaiming": 3.3179, "batchnorm": 3.3239}
    for stage, (_, jax_run, _, _) in parity_runs.items():
        assert abs(jax_run.losses[0] - reference[stage]) < 1e-4, stage


def test_split_loss_matches_the_lecture_split_loss(parity_runs, names_data):
    from jaxmlp.evaluate import eval_loss

    model, jax_run, _, torch_tensors = parity_runs["batchnorm"]
    X, Y = names_data.val
    jax_loss = float(eval_loss(jax_run.state.variables, jnp.asarray(X), jnp.asarray(Y),
                               model=model))
    assert abs(jax_loss - tb.lecture_split_loss(torch_tensors, X, Y)) < 1e-4


def _random_variables(model, seed):
    """Every leaf random (running stats too), so nothing round-trips by luck."""
    variables = model.init(jax.random.key(seed), jnp.zeros((2, 3), jnp.int32))
    leaves, treedef = jax.tree.flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = []
    for k, (path, x) in zip(keys, leaves, strict=True):
        if path[-1].key in ("std", "var"):  # a spread: positive
            new.append(jax.random.uniform(k, x.shape, x.dtype, 0.5, 2.0))
        else:
            new.append(0.5 * jax.random.normal(k, x.shape, x.dtype))
    return {"batch_stats": {}, **jax.tree.unflatten(treedef, new)}


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("stage, semantics", [("kaiming", "lecture"), ("batchnorm", "lecture"),
                                              ("batchnorm", "torch"), ("batchnorm", "flax")])
def test_flax_torch_flax_round_trip_is_exact(torch, stage, semantics):
    model = make_model(stage, vocab_size=27, bn_semantics=semantics)
    variables = _random_variables(model, 3)
    back = tb.tensors_to_variables(tb.variables_to_tensors(variables, model), model)
    assert_same_variables(variables, back)
    sd = tb.variables_to_state_dict(variables, model, num_batches_tracked=7)
    back = tb.state_dict_to_variables(sd, model)
    assert_same_variables(variables, back)
    # The state_dict loads into the matching nn.Module, strictly; and comes back out equal.
    module = tb.torch_module(model)
    module.load_state_dict(sd, strict=True)
    back = tb.state_dict_to_variables(module.state_dict(), model)
    assert_same_variables(variables, back)


@pytest.mark.parametrize("stage", ["kaiming", "batchnorm"])
def test_torch_module_computes_what_the_flax_model_computes(torch, stage, names_data):
    model = make_model(stage, vocab_size=27, bn_semantics="torch")
    variables = _random_variables(model, 5)
    module = tb.torch_module(model)
    module.load_state_dict(tb.variables_to_state_dict(variables, model))
    X = names_data.train.X[:64]
    for train in (False, True):  # eval first: a training pass moves torch's running stats
        module.train(train)
        out = model.apply(variables, jnp.asarray(X), train=train, mutable=["batch_stats"])
        logits, updates = out
        ref = module(torch.as_tensor(X.astype(np.int64)))
        np.testing.assert_allclose(logits, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
        if stage == "batchnorm" and train:  # the running statistics moved the same way
            got = tb.variables_to_state_dict({**variables, **updates}, model)
            sd = module.state_dict()
            for key in ("bn.running_mean", "bn.running_var"):
                np.testing.assert_allclose(got[key].numpy(), sd[key].numpy(), rtol=1e-5,
                                           atol=1e-6)


def test_conversion_rejects_tensors_of_another_model(torch):
    model = make_model("batchnorm", vocab_size=27)
    tensors, _ = tb.lecture_init(make_model("kaiming", vocab_size=27))
    with pytest.raises(ConfigError, match=r"missing.*bngain.*unexpected.*b1"):
        tb.tensors_to_variables(tensors, model)
    tensors, _ = tb.lecture_init(make_model("batchnorm", vocab_size=27, n_hidden=50))
    with pytest.raises(ConfigError, match=r"W1 has shape \(30, 50\).*needs \(30, 200\)"):
        tb.tensors_to_variables(tensors, model)
    tensors, _ = tb.lecture_init(model)
    tensors["W1"] = tensors["W1"].T.contiguous()  # torch Linear's (out, in) layout
    with pytest.raises(ConfigError, match=r"W1 has shape \(200, 30\).*\(in, out\)"):
        tb.tensors_to_variables(tensors, model)


def test_cli_train_torch_stream_retraces_the_lecture(torch, parity_runs, tmp_path, capsys):
    out = tmp_path / "run"
    steps = PARITY_STEPS["batchnorm"]
    assert main(["train", "--stage", "batchnorm", "--torch-stream", "--steps", str(steps),
                 "--out", str(out), "--quiet"]) == 0
    assert "lecture torch stream" in capsys.readouterr().out
    spec = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert spec["torch_stream"] is True and metrics["torch_stream"] is True
    assert abs(metrics["step_losses"]["0"] - 3.3239) < 1e-4
    _, _, torch_losses, _ = parity_runs["batchnorm"]
    np.testing.assert_allclose(np.load(out / "losses.npy"), torch_losses, rtol=1e-4)


def test_cli_reproduce_torch_stream(torch, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--torch-stream", "--steps", "50", "--stages", "softmax-fix",
                 "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "reproduce.json").read_text())
    assert list(results) == ["softmax-fix"]
    assert set(results["softmax-fix"]) == {"train", "val", "test", "step_losses", "seconds"}
    assert list(results["softmax-fix"]["step_losses"]) == ["0"]
    # Step 0 is the lecture's (docs/reference.md), to float rounding.
    assert abs(results["softmax-fix"]["step_losses"]["0"] - 3.3221) < 1e-4
    md = (out / "reproduce.md").read_text()
    assert "| softmax-fix | jaxmlp | 3.3221 |" in md and "| | PyTorch | 3.3221 |" in md
    assert "| | difference | +0.0000 |" in md
    # The same directory again without --force is refused, and nothing is changed.
    before = (out / "reproduce.json").read_bytes()
    assert main(["reproduce", "--steps", "5", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "reproduce.json").read_bytes() == before


def test_without_torch_a_one_line_error_and_nothing_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(tb.TorchNotInstalledError, match=r"pip install torch==2\.13\.0") as e:
        tb.lecture_init(make_model("batchnorm", vocab_size=27))
    assert isinstance(e.value, JaxmlpError) and "\n" not in str(e.value)
    assert "[torch]" in str(e.value)
    for argv in (["train", "--torch-stream", "--steps", "10", "--out", str(tmp_path / "a")],
                 ["reproduce", "--torch-stream", "--steps", "10", "--out", str(tmp_path / "b")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "pip install torch==2.13.0" in err
    assert not any(tmp_path.iterdir())


def test_importing_jaxmlp_does_not_import_torch():
    code = ("import sys, jaxmlp, jaxmlp.torch_bridge, jaxmlp.reproduce, jaxmlp.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_reproduce_without_torch_stream_uses_jax_random_numbers(names_data):
    from jaxmlp.reproduce import markdown_report, reproduce

    results = reproduce(names_data, stages=["tanh-fix"], steps=20, seed=1, log=None)
    step0 = results["tanh-fix"]["step_losses"]["0"]
    # JAX's own init: near the uniform 3.2958 but not the lecture's torch-drawn 3.3135.
    assert abs(step0 - 3.2958) < 0.05 and abs(step0 - 3.3135) > 1e-3
    md = markdown_report(results, steps=20, torch_stream=False, seed=1)
    assert "seed 1" in md and "seed noise" in md and "| tanh-fix | jaxmlp |" in md
