import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmlp import diagnosis, figures, init
from jaxmlp import diagnostics as diag
from jaxmlp.errors import ConfigError
from jaxmlp.models import DeepMLP
from jaxmlp.stages import Schedule, make_model
from jaxmlp.train import TrainConfig, create_train_state, run_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something is drawn


# --- statistics on constructed inputs -------------------------------------------------------

hist_jit = jax.jit(diag.histogram, static_argnums=3)
sym_jit = jax.jit(diag.symmetric_histogram, static_argnums=1)


def test_histogram_equals_numpy_and_runs_in_jit():
    x = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    for lo, hi in ((-1.0, 1.0), (-3.5, 2.0)):
        dens, edges = hist_jit(x, lo, hi, 40)
        ref, ref_edges = np.histogram(x, bins=40, range=(lo, hi), density=True)
        np.testing.assert_allclose(edges, ref_edges, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dens, ref, rtol=1e-5)
    dens, edges = sym_jit(x, 30)  # range from the data itself
    ref, _ = np.histogram(x, bins=30, range=(-np.abs(x).max(), np.abs(x).max()), density=True)
    np.testing.assert_allclose(dens, ref, rtol=1e-5)
    dens, _ = sym_jit(np.zeros(5000, np.float32), 30)  # an all-zero gradient stays finite
    assert np.isfinite(dens).all()


def test_saturated_share_and_dead_units_on_constructed_input():
    t = jnp.array([[0.995, 0.98, 0.1, -0.999],
                   [-0.999, -0.98, 0.2, -0.995],
                   [0.993, 0.5, -0.3, 1.0],
                   [-0.991, 0.0, 0.96, 0.992]])
    deep = diag.activation_stats(t, "tanh", 0.97, bins=None)
    # |t| > 0.97: column 0 all 4, column 1 two, column 2 none, column 3 all 4.
    assert float(deep["saturated"]) == pytest.approx(10 / 16)
    assert int(deep["dead"]) == 2
    shallow = diag.activation_stats(t, "tanh", 0.99, bins=None)  # 0.98s no longer count
    assert float(shallow["saturated"]) == pytest.approx(8 / 16)
    assert int(shallow["dead"]) == 2
    assert float(deep["mean"]) == pytest.approx(float(np.mean(t)), abs=1e-6)
    assert float(deep["std"]) == pytest.approx(float(np.std(t, ddof=1)), rel=1e-5)  # torch's
    relu = diag.activation_stats(jnp.array([[0.0, 1.0], [0.0, -0.0], [0.0, 2.0]]), "relu")
    assert int(relu["dead"]) == 1 and float(relu["saturated"]) == pytest.approx(4 / 6)
    with pytest.raises(ConfigError, match="unknown activation"):
        diag.saturated(t, "gelu")


def test_update_ratio_is_log10_std_ratio_of_2d_params_only():
    p = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.zeros(4)}
    u = {"w": jnp.full((3, 4), 0.0).at[0, 0].set(0.3), "b": jnp.ones(4)}
    r = diag.update_ratios(u, p)
    assert set(r) == {"w"}
    expected = math.log10(np.std(np.asarray(u["w"]), ddof=1) / np.std(np.arange(12.0), ddof=1))
    assert float(r["w"]) == pytest.approx(expected, rel=1e-5)


# --- a tiny network: probe against a hand-unrolled computation ------------------------------

TINY = dict(vocab_size=5, block_size=2, n_embd=3, n_hidden=4, depth=2)


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(0, 5, (n, 2)), jnp.int32),
            jnp.asarray(rng.integers(0, 5, n), jnp.int32))


def _by_hand(params, offsets, X, Y, norm):
    """The tiny DeepMLP written out: layers named as the lecture's list, plus an offset added
    to each tanh output (whose gradient is the activation gradient)."""
    p = params
    x = p["embed"]["embedding"][X].reshape(X.shape[0], -1)
    acts = {}

    def bn(h, q):
        mean, var = h.mean(0), h.var(0, ddof=1)  # the lecture's class: unbiased var, eps 1e-5
        return q["scale"] * (h - mean) / jnp.sqrt(var + 1e-5) + q["bias"]

    if norm == "batchnorm":
        for lin, nrm, act in (("linear0", "bn1", "tanh2"), ("linear3", "bn4", "tanh5")):
            x = jnp.tanh(bn(x @ p[lin]["kernel"], p[nrm])) + offsets[act]
            acts[act] = x
        logits = bn(x @ p["linear6"]["kernel"], p["bn7"])
    else:
        for lin, act in (("linear0", "tanh1"), ("linear2", "tanh3")):
            x = jnp.tanh(x @ p[lin]["kernel"] + p[lin]["bias"]) + offsets[act]
            acts[act] = x
        logits = x @ p["linear4"]["kernel"] + p["linear4"]["bias"]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), Y[:, None], 1).mean()
    return loss, acts


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_probe_equals_a_hand_unrolled_computation(norm):
    model = DeepMLP(**TINY, norm=norm, gain=5 / 3)
    X, Y = _batch()
    variables = jax.jit(model.init)(jax.random.key(3), X)
    names = [n for n in model.layer_names if n.startswith("tanh")]
    offsets = {n: jnp.zeros((X.shape[0], 4)) for n in names}
    (loss, acts), (g_params, g_acts) = jax.jit(jax.value_and_grad(
        lambda p, o: _by_hand(p, o, X, Y, norm), argnums=(0, 1), has_aux=True))(
            variables["params"], offsets)

    out = diag.probe_jit(variables, X, Y, model=model, threshold=0.9, raw=True)
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert sorted(out["activations"]) == sorted(names) == sorted(out["gradients"])
    for n in names:
        a, g = np.asarray(acts[n]), np.asarray(g_acts[n])
        s = out["activations"][n]
        np.testing.assert_allclose(s["values"], a, rtol=1e-5, atol=1e-6)
        assert float(s["std"]) == pytest.approx(a.std(ddof=1), rel=1e-4)
        assert float(s["saturated"]) == pytest.approx((np.abs(a) > 0.9).mean())
        gs = out["gradients"][n]
        assert abs(float(gs["mean"]) - g.mean()) < 1e-6 * np.abs(g).max()
        assert float(gs["std"]) == pytest.approx(g.std(ddof=1), rel=1e-4)
        ref, _ = np.histogram(g, bins=diag.BINS, range=(-np.abs(g).max(), np.abs(g).max()),
                              density=True)
        np.testing.assert_allclose(gs["hist"], ref, rtol=1e-3, atol=1e-3 * ref.max())
    flat_p, flat_g = diag.flat(variables["params"]), diag.flat(g_params)
    two_d = {k for k, v in flat_p.items() if v.ndim == 2}
    assert set(out["weights"]) == two_d
    for k in two_d:
        g, w = np.asarray(flat_g[k]), np.asarray(flat_p[k])
        s = out["weights"][k]
        assert float(s["grad_std"]) == pytest.approx(g.std(ddof=1), rel=1e-4)
        assert float(s["grad_data_ratio"]) == pytest.approx(g.std(ddof=1) / w.std(ddof=1),
                                                            rel=1e-4)


def test_probe_of_the_shallow_mlp_names_its_tanh_layer_h():
    model = make_model("kaiming", 5, block_size=2, n_embd=3, n_hidden=6)
    X, Y = _batch()
    # eval_shape traces the probe (names, shapes) without compiling it
    out = jax.eval_shape(lambda: diag.probe(model.init(jax.random.key(0), X), X, Y, model=model))
    assert list(out["activations"]) == ["h"] and list(out["gradients"]) == ["h"]
    assert set(out["weights"]) == {"embed/embedding", "hidden/kernel", "out/kernel"}
    assert out["activations"]["h"]["hist"].shape == (diag.BINS,)


def test_init_variables_still_apply_to_any_batch_size():
    # probe points create no variable at init, so init on 2 rows then apply on 16 works.
    model = DeepMLP(**TINY)
    X, _ = _batch()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), X[:2]))
    assert set(variables) == {"params", "batch_stats"}
    logits, _ = jax.eval_shape(
        lambda v: model.apply(v, X, train=True, mutable=["batch_stats"]), variables)
    assert logits.shape == (16, 5)


def test_probe_many_is_probe_vmapped_over_gains(tmp_path):
    X, Y = _batch()
    model = DeepMLP(**TINY, norm="none", gain=5 / 3)  # any gain applies them all
    gains = (0.5, 1.0, 5 / 3, 3.0)
    stacked = diag.stack_inits(lambda g: DeepMLP(**TINY, norm="none", gain=g), gains,
                               jax.random.key(1), X)
    many = jax.device_get(diag.probe_many(stacked, X, Y, model=model, threshold=0.9))
    one = diag.probe_jit({"params": jax.tree.map(lambda a: a[3], stacked)}, X, Y, model=model,
                         threshold=0.9, raw=True)
    for n in one["activations"]:
        for k in ("std", "saturated"):
            assert float(many["activations"][n][k][3]) == pytest.approx(
                float(one["activations"][n][k]), rel=1e-5)
    # the same draws scaled by a larger gain: larger activations in the last tanh layer
    stds = many["activations"]["tanh3"]["std"]
    assert list(stds) == sorted(stds)
    assert_png(figures.plot_gain_study(gains, many, tmp_path / "gains.png"))


# --- the fused diagnosed run -----------------------------------------------------------------

run_steps_jit = jax.jit(run_steps, static_argnames=("model", "config", "num_steps"))


@pytest.fixture(scope="module")
def tiny_run():
    model = DeepMLP(**TINY)
    config = TrainConfig(steps=6, batch_size=8, schedule=Schedule((0.1, 0.01), (4,)))
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.integers(0, 5, (64, 2)), jnp.int32)
    Y = jnp.asarray(rng.integers(0, 5, 64), jnp.int32)
    ix = jnp.asarray(rng.integers(0, 64, (6, 8)), jnp.int32)
    state0 = create_train_state(jax.random.key(0), model, config)
    d = diag.diagnose(state0, X, Y, model, config, steps=6, every=2, stats_every=4, batch_ix=ix)
    return model, config, X, Y, ix, state0, d


def test_diagnosed_run_trains_exactly_like_run_steps(tiny_run):
    model, config, X, Y, ix, state0, d = tiny_run
    state, trace = d.state, d.trace
    ref_state, ref_losses = run_steps_jit(state0, X, Y, ix, model=model, config=config,
                                          num_steps=6)
    # The same steps; XLA may fuse the two programs differently (float32 rounding only).
    np.testing.assert_allclose(trace["losses"], ref_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(ref_state.variables),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert list(trace["step"]) == [1, 3, 5]
    assert list(np.asarray(trace["has_stats"])) == [False, True, False]  # (step + 1) % 4 == 0


def test_recorded_diagnostics_equal_a_direct_computation(tiny_run):
    model, config, X, Y, ix, state0, d = tiny_run
    trace = d.trace
    # The update ratio of step 3 (lr 0.1 before the boundary at 4): log10(std(lr*g)/std(p')).
    s3, _ = run_steps_jit(state0, X, Y, ix[:3], model=model, config=config, num_steps=3)
    Xb, Yb = X[ix[3]], Y[ix[3]]

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": s3.batch_stats}, Xb,
                                train=True, mutable=["batch_stats"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), Yb[:, None], 1).mean()

    g = diag.flat(jax.jit(jax.grad(loss))(s3.params))
    p = diag.flat(s3.params)
    for name in ("linear3/kernel", "embed/embedding"):
        new = np.asarray(p[name] - 0.1 * g[name])
        expected = math.log10(np.std(0.1 * np.asarray(g[name]), ddof=1) / np.std(new, ddof=1))
        assert float(trace["update_ratios"][name][1]) == pytest.approx(expected, abs=1e-4)
    # The layer statistics recorded at step 3 are those of probe(state after 3 steps, batch 3).
    direct = diag.probe_jit(s3.variables, Xb, Yb, model=model, bins=None)
    for n in ("tanh2", "tanh5"):
        for k in ("mean", "std", "saturated"):
            assert float(trace["stats"]["activations"][n][k][1]) == pytest.approx(
                float(direct["activations"][n][k]), rel=1e-5, abs=1e-7)
        assert float(trace["stats"]["gradients"][n]["std"][1]) == pytest.approx(
            float(direct["gradients"][n]["std"]), rel=1e-5)


@pytest.mark.parametrize("steps, every, stats_every, match", [
    (10, 3, 0, "must be a multiple of --every"),
    (10, 0, 0, "--every must be a positive integer"),
    (10, 2, 3, "--stats-every .* must be 0 or a multiple"),
])
def test_bad_recording_intervals_are_refused(tiny_run, steps, every, stats_every, match):
    model, config, X, Y, _, state0, *_ = tiny_run
    with pytest.raises(ConfigError, match=match):
        diag.run_diagnosed(state0, X, Y, model=model, config=config, num_steps=steps,
                           every=every, stats_every=stats_every)


def test_diagnose_report_and_figures(tiny_run, tmp_path):
    *_, d = tiny_run
    report = diagnosis.to_json(d)
    json.dumps(report, allow_nan=False)
    assert report["step"] == 6
    assert [a["layer"] for a in report["activations"]] == ["tanh2", "tanh5"]
    assert set(report["activations"][0]) == {"layer", "mean", "std", "saturated"}
    assert [g["layer"] for g in report["gradients"]] == ["tanh2", "tanh5"]
    assert [w["name"] for w in report["weights"]] == [
        "embed/embedding", "linear0/kernel", "linear3/kernel", "linear6/kernel"]
    assert report["weights"][1]["shape"] == [6, 4]
    assert all(len(v) == 3 for v in report["update_ratios"].values())  # every 2nd of 6 steps
    assert report["update_ratio_steps"] == [1, 3, 5]
    final = d.final["activations"]
    assert report["dead_units"] == {n: int(final[n]["dead"]) for n in ("tanh2", "tanh5")}
    assert report["activations"][1]["std"] == pytest.approx(float(final["tanh5"]["std"]))
    assert report["history"]["step"] == [3]
    # (jaxmlp diagnose's test checks the other figures of write_diagnosis_figures)
    assert_png(figures.plot_layer_history(diagnosis.history(d), tmp_path / "history.png"))


def test_demos_reproduce_the_articles_numbers(tmp_path):
    demo = init.fan_in_demo(jax.random.key(0))
    stds = {k: float(np.std(v)) for k, v in demo["outputs"].items()}
    for label, want in (("w", math.sqrt(10)), ("w * 0.2", 0.2 * math.sqrt(10)),
                        ("w / sqrt(10)", 1.0), ("w * (5/3) / sqrt(10)", 5 / 3)):
        assert stds[label] == pytest.approx(want, rel=0.15)
    lb = init.linear_bn_demo(jax.random.key(0))
    lin, bn = lb["Linear"], lb["Linear + BatchNorm"]
    assert float(jnp.std(lin["y"])) == pytest.approx(math.sqrt(1000), rel=0.15)
    assert float(jnp.std(lin["dx"])) == pytest.approx(math.sqrt(1000), rel=0.15)
    assert float(jnp.std(bn["y"])) == pytest.approx(1.0, rel=0.01)
    assert float(jnp.std(bn["dx"])) == pytest.approx(1.0, rel=0.15)
    assert_png(figures.plot_fan_in_demo(demo, tmp_path / "fan-in.png"))
    assert_png(figures.plot_linear_bn_demo(lb, tmp_path / "linear-bn.png"))


def test_layer_labels_match_the_lecture_legend():
    assert figures.layer_label("tanh5") == "layer 5 (tanh)"
    assert figures.layer_label("h") == "h (tanh)"
    assert diag.natural_key("tanh11") > diag.natural_key("tanh2")
