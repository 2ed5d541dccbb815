import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp import diagnostics as diag
from jaxmlp.checkpoint import RunSpec
from jaxmlp.cli import main
from jaxmlp.errors import ConfigError
from jaxmlp.evaluate import calibrate
from jaxmlp.models import DeepMLP
from jaxmlp.stages import Schedule, get_stage, make_model, stage_names
from jaxmlp.train import TrainConfig, cross_entropy


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img[..., :3].std() > 0.01


def n_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def deep_inits():
    out = {}
    for stage in ("deep", "deep-nobn"):
        model = make_model(stage, 27)
        out[stage] = model, model.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    return out


def test_presets_have_the_lectures_parameter_counts_and_layers(deep_inits):
    model, v = deep_inits["deep"]
    assert isinstance(model, DeepMLP) and model.batchnorm and model.n_hidden == 100
    assert n_params(v["params"]) == 47_024
    assert model.layer_names == ["linear0", "bn1", "tanh2", "linear3", "bn4", "tanh5", "linear6",
                                 "bn7", "tanh8", "linear9", "bn10", "tanh11", "linear12", "bn13",
                                 "tanh14", "linear15", "bn16"]
    assert set(v["batch_stats"]) == {"bn1", "bn4", "bn7", "bn10", "bn13", "bn16"}
    assert set(v["batch_stats"]["bn16"]) == {"mean", "var"}  # the lecture's class: variance
    model, v = deep_inits["deep-nobn"]
    assert not model.batchnorm and n_params(v["params"]) == 46_497
    assert model.layer_names == ["linear0", "tanh1", "linear2", "tanh3", "linear4", "tanh5",
                                 "linear6", "tanh7", "linear8", "tanh9", "linear10"]
    assert "batch_stats" not in v


def test_presets_initialise_as_the_lecture(deep_inits):
    p = deep_inits["deep"][1]["params"]
    assert "bias" not in p["linear0"]  # batch norm follows: no bias
    np.testing.assert_allclose(p["bn16"]["scale"], 0.1, rtol=1e-6)  # last gamma x 0.1
    np.testing.assert_array_equal(p["bn1"]["scale"], 1.0)
    for name in ("linear3", "linear6", "linear9", "linear12"):  # N(0, 1) / sqrt(100), gain 1
        assert float(jnp.std(p[name]["kernel"])) == pytest.approx(0.1, rel=0.05)
    assert float(jnp.std(p["linear0"]["kernel"])) == pytest.approx(1 / math.sqrt(30), rel=0.1)
    q = deep_inits["deep-nobn"][1]["params"]
    for name in ("linear2", "linear4", "linear6", "linear8"):  # gain 5/3
        assert float(jnp.std(q[name]["kernel"])) == pytest.approx(5 / 3 / 10, rel=0.05)
        np.testing.assert_array_equal(q[name]["bias"], 0.0)  # biases start at zero
    assert float(jnp.std(q["linear10"]["kernel"])) == pytest.approx(0.01, rel=0.1)  # x0.1, no gain


def test_stages_and_schedules():
    assert {"deep", "deep-nobn"} <= set(stage_names())
    get_stage("deep-nobn")
    deep, nobn = get_stage("deep").schedule, get_stage("deep-nobn").schedule
    assert deep == Schedule((0.1, 0.01), (150_000,)) == nobn
    assert get_stage("batchnorm").schedule.boundaries == (100_000,)
    assert make_model("batchnorm", 27).n_hidden == 200  # the shallow default is unchanged
    assert make_model("deep", 27, n_hidden=64, depth=3).n_hidden == 64
    with pytest.raises(ConfigError, match=r"unknown stage 'deeper'; choose one of .*deep-nobn"):
        get_stage("deeper")


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="groupnorm"), "unknown norm 'groupnorm'; use one of batchnorm, layernorm, none"),
    (dict(activation="gelu"), "unknown activation 'gelu'; use one of tanh, relu"),
    (dict(depth=-1), "depth must be a non-negative integer"),
    (dict(bn_semantics="keras"), "unknown batch-norm semantics 'keras'"),
])
def test_bad_fields_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DeepMLP(27, **kwargs)


def test_variants_build_and_run():
    X = jnp.zeros((4, 3), jnp.int32)
    model = DeepMLP(27, n_hidden=8, depth=2, norm="layernorm", activation="relu",
                    gain=math.sqrt(2))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), X))  # traced, not compiled
    # C, Linear(30 -> 8) and (8 -> 8) and (8 -> 27) with biases, 2 x 8 + 2 x 8 + 2 x 27 LN
    assert n_params(v["params"]) == 270 + 31 * 8 + 9 * 8 + 9 * 27 + 2 * 8 + 2 * 8 + 2 * 27
    assert jax.eval_shape(lambda v: model.apply(v, X, train=True), v).shape == (4, 27)
    assert model.layer_names == ["linear0", "ln1", "relu2", "linear3", "ln4", "relu5", "linear6",
                                 "ln7"]
    assert not model.batchnorm and DeepMLP(27, depth=0).layer_names == ["linear0", "bn1"]


def test_initial_loss_is_near_uniform(deep_inits, names_data):
    X, Y = (jnp.asarray(a[:512]) for a in names_data.train)
    for model, v in deep_inits.values():
        logits, _ = jax.jit(lambda v, X, m=model: m.apply(v, X, train=True,
                                                          mutable=["batch_stats"]))(v, X)
        assert float(cross_entropy(logits, Y)) == pytest.approx(-math.log(1 / 27), abs=0.05)


def test_run_spec_round_trip_and_calibration(deep_inits, names_data):
    model, v = deep_inits["deep"]
    spec = RunSpec("deep", 0, model, TrainConfig(schedule=get_stage("deep").schedule),
                   names_data.vocab, "data/names.txt")
    back = RunSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back.model == model and back.train == spec.train
    X = jnp.asarray(names_data.train.X[:4096])
    cal = calibrate(v, X, model=model)
    emb = v["params"]["embed"]["embedding"][X].reshape(X.shape[0], -1)
    h = emb @ v["params"]["linear0"]["kernel"]
    np.testing.assert_allclose(cal["batch_stats"]["bn1"]["mean"], h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cal["batch_stats"]["bn1"]["var"], h.var(0, ddof=1), rtol=1e-4)


def test_forward_backward_equal_the_lectures_torch_classes(deep_inits, names_data):
    """The lecture's Linear / BatchNorm1d / Tanh classes in torch, with our initial weights:
    same loss, same tanh outputs, same gradients at them (retain_grad), same running stats."""
    torch = pytest.importorskip("torch")
    model, v = deep_inits["deep"]
    X, Y = names_data.train.X[:32], names_data.train.Y[:32]
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a), requires_grad=True), v["params"])

    def bn(x, q):  # the lecture's BatchNorm1d in training mode
        mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)  # unbiased
        return q["scale"] * (x - mean) / torch.sqrt(var + 1e-5) + q["bias"], mean, var

    x = p["embed"]["embedding"][torch.tensor(X).long()].view(32, -1)
    outs, running = {}, {}
    for i in range(5):
        x, mean, var = bn(x @ p[f"linear{3 * i}"]["kernel"], p[f"bn{3 * i + 1}"])
        x = torch.tanh(x)
        x.retain_grad()
        outs[f"tanh{3 * i + 2}"] = x
        running[f"bn{3 * i + 1}"] = (0.1 * mean.detach()[0], 0.9 + 0.1 * var.detach()[0])
    logits, *_ = bn(x @ p["linear15"]["kernel"], p["bn16"])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(Y).long())
    loss.backward()

    out = diag.probe_jit(v, jnp.asarray(X), jnp.asarray(Y), model=model, raw=True)
    assert float(out["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    for name, t in outs.items():
        np.testing.assert_allclose(out["activations"][name]["values"], t.detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
        assert float(out["gradients"][name]["std"]) == pytest.approx(t.grad.std().item(),
                                                                     rel=1e-3)
    for name, w in (("embed/embedding", p["embed"]["embedding"]),
                    ("linear9/kernel", p["linear9"]["kernel"])):
        s = out["weights"][name]
        assert float(s["grad_std"]) == pytest.approx(w.grad.std().item(), rel=1e-3)
        assert float(s["grad_data_ratio"]) == pytest.approx(
            (w.grad.std() / w.std()).item(), rel=1e-3)
    _, updated = jax.jit(lambda v, X: model.apply(v, X, train=True, mutable=["batch_stats"]))(
        v, jnp.asarray(X))
    for name, (mean, var) in running.items():
        np.testing.assert_allclose(updated["batch_stats"][name]["mean"], mean.numpy(),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(updated["batch_stats"][name]["var"], var.numpy(), rtol=1e-4)


# --- the command line -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_names(tmp_path_factory):
    """The first 400 names (all 26 letters): the commands' evaluation passes stay short."""
    from jaxmlp.data import DEFAULT_DATA

    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(DEFAULT_DATA.read_text().split()[:400]) + "\n")
    return path


def test_cli_train_deep_end_to_end(tmp_path, capsys, small_names):
    out = tmp_path / "run"
    assert main(["train", "--stage", "deep-nobn", "--steps", "30", "--out", str(out),
                 "--quiet", "--data", str(small_names)]) == 0
    assert "46,497 parameters" in capsys.readouterr().out
    spec = json.loads((out / "run.json").read_text())
    assert spec["model"]["class"] == "DeepMLP" and spec["train"]["boundaries"] == [150_000]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["val"]) and metrics["val"] < 3.3
    assert main(["eval", "--run", str(out)]) == 0
    assert f"val   {metrics['val']:.4f}" in capsys.readouterr().out  # the spec rebuilds it
    assert main(["train", "--stage", "deep", "--n-hidden", "0", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "t").exists()


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory, small_names):
    out = tmp_path_factory.mktemp("diag") / "deep"
    code = main(["diagnose", "--stage", "deep", "--steps", "20", "--out", str(out), "--data",
                 str(small_names)])
    return code, out


def test_cli_diagnose_writes_the_report_and_figures(diagnosed, capsys):
    code, out = diagnosed
    assert code == 0
    report = json.loads((out / "diagnostics.json").read_text())
    assert report["step"] == 20
    layers = ["tanh2", "tanh5", "tanh8", "tanh11", "tanh14"]
    assert [a["layer"] for a in report["activations"]] == layers
    assert [g["layer"] for g in report["gradients"]] == layers
    for a in report["activations"]:
        assert set(a) == {"layer", "mean", "std", "saturated"}
        assert 0.3 < a["std"] < 0.9 and 0 <= a["saturated"] < 0.2
    names = [w["name"] for w in report["weights"]]
    assert names == ["embed/embedding"] + [f"linear{i}/kernel" for i in (0, 3, 6, 9, 12, 15)]
    assert report["weights"][-1]["shape"] == [100, 27]
    assert all(w["grad_data_ratio"] > 0 for w in report["weights"])
    assert set(report["update_ratios"]) == set(names)
    assert all(len(v) == 20 and all(-5 < x < 0 for x in v)
               for v in report["update_ratios"].values())
    assert report["dead_units"] == dict.fromkeys(layers, 0)
    assert report["saturation_threshold"] == 0.97
    assert set(report["split_losses"]) == {"train", "val"}
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 8
    for p in pngs:
        assert_png(p)


def test_cli_diagnose_refuses_bad_input_without_writing(diagnosed, capsys):
    _, out = diagnosed
    before = (out / "diagnostics.json").read_bytes()
    assert main(["diagnose", "--stage", "deep", "--steps", "20", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty; pass --force" in err and err.count("\n") == 1
    assert main(["diagnose", "--steps", "20", "--every", "3", "--out", str(out / "x"),
                 "--stats-every", "0"]) == 2
    assert "--steps (20) must be a multiple of --every (3)" in capsys.readouterr().err
    assert main(["diagnose", "--stage", "huge", "--out", str(out / "y")]) == 2
    assert not (out / "x").exists() and not (out / "y").exists()
    assert (out / "diagnostics.json").read_bytes() == before
