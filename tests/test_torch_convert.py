"""torch_module and the state_dict conversions for every model jaxmlp makes; key maps for a
user's own torch model; experiments/kaiming_relu.py."""

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxmlp import torch_bridge as tb
from jaxmlp.errors import ConfigError
from jaxmlp.models import BN_PRESETS, MLP, DeepMLP
from jaxmlp.stages import make_model

ROOT = Path(__file__).resolve().parent.parent
VOCAB, BLOCK, LR = 27, 3, 0.1
# The variants' hidden width is the vocabulary's: fewer shapes for JAX to compile op by op.
# The lecture test, the key-map tests and the callable's DeepMLP keep every size distinct.
SMALL = {"n_embd": 4, "n_hidden": VOCAB}
DISTINCT = {"n_embd": 4, "n_hidden": 16}

# Every kind of model: MLP with and without each batch-norm preset, DeepMLP for every norm,
# activation and a few depths (0 included), momentum overrides, a bias before a batch norm.
VARIANTS = {
    "mlp": MLP(VOCAB, **SMALL),
    **{f"mlp-bn-{s}": MLP(VOCAB, **SMALL, batchnorm=True, bn_semantics=s)
       for s in ("lecture", "lecture-class", "flax")},
    "mlp-bn-torch-momentum0.5": MLP(VOCAB, **SMALL, batchnorm=True, bn_semantics="torch",
                                    bn_momentum=0.5),
    "deep-bn-tanh": DeepMLP(VOCAB, **SMALL, depth=2),
    "deep-bn-lecture-relu": DeepMLP(VOCAB, **SMALL, depth=1, bn_semantics="lecture",
                                    activation="relu"),
    "deep-bn-torch-bias-momentum1": DeepMLP(VOCAB, **SMALL, depth=1, bn_semantics="torch",
                                            use_bias=True, bn_momentum=1.0),
    "deep-bn-flax-relu": DeepMLP(VOCAB, **SMALL, depth=3, bn_semantics="flax", activation="relu"),
    "deep-ln-tanh": DeepMLP(VOCAB, **SMALL, depth=2, norm="layernorm"),
    "deep-ln-relu": DeepMLP(VOCAB, **SMALL, depth=1, norm="layernorm", activation="relu"),
    "deep-none-relu": DeepMLP(VOCAB, **SMALL, depth=3, norm="none", activation="relu"),
    "deep-none-depth0": DeepMLP(VOCAB, **SMALL, depth=0, norm="none"),
}


@pytest.fixture(scope="module")
def torch():
    """torch on one thread (small tensors; spare threads only spin on a busy machine)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def kaiming_run(request, tmp_path_factory, cli_env):
    """experiments/kaiming_relu.py with few steps, in its own process: started before this
    module's first test when its test is selected, so that it runs beside the others (on the
    second core) instead of after them. Yields (Popen, output directory)."""
    wanted = any(item.name == "test_kaiming_relu_experiment_runs"
                 for item in request.session.items)
    if not wanted or importlib.util.find_spec("torch") is None:
        yield None
        return
    out_dir = tmp_path_factory.mktemp("kaiming")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "kaiming_relu.py"), "--steps", "20",
         "--seeds", "2", "--out", str(out_dir)],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out_dir
    if proc.poll() is None:  # its test did not run to the end
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def batches():
    """Three training minibatches and one to compare on: tokens (32, 3), targets (32,)."""
    rng = np.random.default_rng(0)
    return [(rng.integers(0, VOCAB, (32, BLOCK)), rng.integers(0, VOCAB, 32)) for _ in range(4)]


def sgd_step(model, variables, X, Y):
    """One SGD step (jaxmlp's optimizer, optax.sgd) in training mode; (variables, loss)."""

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, jnp.asarray(X),
                                      train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    tx = optax.sgd(LR)
    step, _ = tx.update(grads, tx.init(variables["params"]))
    params = optax.apply_updates(variables["params"], step)
    return {**variables, **updates, "params": params}, float(loss)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, batches):
    """(model, {"init": variables at a random init, "trained": after 3 SGD steps})."""
    model = VARIANTS[request.param]
    key, bias_key = jax.random.split(jax.random.key(len(request.param)))
    # Initialised at the batch size of the tests: eager JAX compiles each op once per shape.
    variables = {"batch_stats": {}, **model.init(key, jnp.zeros((32, BLOCK), jnp.int32))}
    # Biases drawn too (Flax starts them at 0, torch's Linear does not): a zero bias would
    # hide a missing or misplaced one, and one before a batch norm only moves by rounding.
    leaves, treedef = jax.tree.flatten_with_path(variables["params"])
    variables["params"] = jax.tree.unflatten(treedef, [
        0.1 * jax.random.normal(jax.random.fold_in(bias_key, i), x.shape)
        if path[-1].key == "bias" else x for i, (path, x) in enumerate(leaves)])
    trained = variables
    for X, Y in batches[:3]:
        trained, _ = sgd_step(model, trained, X, Y)
    return model, {"init": variables, "trained": trained}


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def running_stats(state_dict) -> dict:
    return {k: v.numpy() for k, v in state_dict.items() if ".running_" in k}


@pytest.mark.parametrize("snapshot", ["init", "trained"])
def test_torch_module_computes_what_the_model_computes(torch, variant, batches, snapshot):
    model, snapshots = variant
    variables = snapshots[snapshot]
    module = tb.torch_module(model, variables)
    X = batches[3][0]
    for train in (False, True):  # eval first: a training pass moves torch's running stats
        module.train(train)
        logits, updates = model.apply(variables, jnp.asarray(X), train=train,
                                      mutable=["batch_stats"])
        ref = module(torch.as_tensor(X)).detach().numpy()
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5, err_msg=f"train={train}")
    # The running statistics moved the same way (batch_stats of the training pass).
    got = running_stats(tb.variables_to_state_dict({**variables, **updates}, model))
    want = running_stats(module.state_dict())
    assert got.keys() == want.keys() and (model.batchnorm == bool(got))
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_one_sgd_step_gives_the_same_parameters(torch, variant, batches):
    model, snapshots = variant
    variables = snapshots["trained"]
    X, Y = batches[3]
    after, loss = sgd_step(model, variables, X, Y)

    module = tb.torch_module(model, variables).train()
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    torch_loss = torch.nn.functional.cross_entropy(module(torch.as_tensor(X)),
                                                   torch.as_tensor(Y))
    torch_loss.backward()
    opt.step()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-6)
    got, want = tb.variables_to_state_dict(after, model), module.state_dict()
    assert list(got) == list(want)
    # Relative to each tensor's scale: a few entries sit near zero.
    for key in (k for k in got if not k.endswith("num_batches_tracked")):
        a, b = got[key].numpy(), want[key].numpy()
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-30), key


@pytest.mark.parametrize("snapshot", ["init", "trained"])
def test_export_then_import_is_exact(torch, variant, snapshot):
    model, snapshots = variant
    variables = snapshots[snapshot]
    sd = tb.variables_to_state_dict(variables, model, num_batches_tracked=3)
    assert_same_variables(tb.state_dict_to_variables(sd, model), variables)
    module = tb.torch_module(model)
    module.load_state_dict(sd, strict=True)  # every key, every shape
    assert_same_variables(tb.state_dict_to_variables(module.state_dict(), model), variables)


def test_state_dict_keys_are_the_modules_own(torch, variant):
    model, _ = variant
    keys = tb.state_dict_keys(model)
    module_keys = [k for k in tb.torch_module(model).state_dict()
                   if not k.endswith("num_batches_tracked")]
    assert list(keys) == module_keys
    assert len(set(keys.values())) == len(keys)


def test_batch_norm_layers_carry_epsilon_and_momentum_exactly(torch):
    from jaxmlp.torch_bridge import modules as tm

    kinds = {"lecture": tm.StdBatchNorm1d, "lecture-class": tm.VarianceBatchNorm1d,
             "torch": torch.nn.BatchNorm1d, "flax": tm.VarianceBatchNorm1d}
    for semantics, spec in BN_PRESETS.items():
        for momentum in (None, 0.0, 0.25):
            for model in (MLP(VOCAB, **SMALL, batchnorm=True, bn_semantics=semantics,
                              bn_momentum=momentum),
                          DeepMLP(VOCAB, **SMALL, depth=1, bn_semantics=semantics,
                                  bn_momentum=momentum)):
                module = tb.torch_module(model)
                bns = [m for m in module.modules() if "BatchNorm" in type(m).__name__]
                assert len(bns) == (1 if isinstance(model, MLP) else 2)
                for bn in bns:
                    assert type(bn) is kinds[semantics], semantics
                    assert bn.eps == spec.epsilon  # 0 stays 0
                    assert bn.momentum == (spec.momentum if momentum is None else momentum)
    assert BN_PRESETS["lecture"].epsilon == 0
    ln = tb.torch_module(DeepMLP(VOCAB, **SMALL, depth=1, norm="layernorm")).layers[1]
    assert type(ln) is torch.nn.LayerNorm and ln.eps == 1e-5


def test_lecture_preset_export_matches_within_2e_6(torch, names_data):
    """The lecture's batchnorm stage (running std, epsilon 0) at its own sizes and init, with
    running statistics, gain and bias moved away from 0 and 1: small running stds, where an
    epsilon would show."""
    model = make_model("batchnorm", VOCAB)
    assert model.bn_semantics == "lecture"
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, BLOCK), jnp.int32))
    k = jax.random.split(jax.random.key(1), 4)
    variables["batch_stats"]["bn"] = {"mean": 0.5 * jax.random.normal(k[0], (200,)),
                                      "std": jax.random.uniform(k[1], (200,), None, 0.05, 1.0)}
    variables["params"]["bn"] = {"scale": 1 + 0.1 * jax.random.normal(k[2], (200,)),
                                 "bias": 0.1 * jax.random.normal(k[3], (200,))}
    module = tb.torch_module(model, variables).eval()
    X = torch.as_tensor(names_data.val.X[:5000])
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(X.numpy())))
    assert np.abs(logits - module(X).detach().numpy()).max() <= 2e-6
    # The setting tells: torch.nn.BatchNorm1d's epsilon (1e-5) with running_var = std**2 in
    # place of the running std is off by more than ten times as much.
    bn = torch.nn.BatchNorm1d(200, eps=1e-5).eval()
    with torch.no_grad():
        bn.load_state_dict({"weight": module.bn.weight, "bias": module.bn.bias,
                            "running_mean": module.bn.running_mean,
                            "running_var": module.bn.running_std**2}, strict=False)
        with_eps = module.out(torch.tanh(bn(module.hidden(module.embed(X).flatten(1)))))
    assert np.abs(logits - with_eps.numpy()).max() > 2e-5


# ---------------------------------------------------------------------------------------------
# A user's own torch model: key maps


def sequential_mlp(torch, n_embd=4, n_hidden=16):
    """A user's nn.Sequential of MLP's shapes with torch's batch norm."""
    tnn = torch.nn
    return tnn.Sequential(tnn.Embedding(VOCAB, n_embd), tnn.Flatten(),
                          tnn.Linear(BLOCK * n_embd, n_hidden, bias=False),
                          tnn.BatchNorm1d(n_hidden), tnn.Tanh(), tnn.Linear(n_hidden, VOCAB))


SEQUENTIAL_MAP = {"0.weight": "embed/embedding", "2.weight": "hidden/kernel",
                  "3.weight": "bn/scale", "3.bias": "bn/bias", "3.running_mean": "bn/mean",
                  "3.running_var": "bn/var", "5.weight": "out/kernel", "5.bias": "out/bias"}
SEQUENTIAL_MODEL = MLP(VOCAB, **DISTINCT, batchnorm=True, bn_semantics="torch")


@pytest.fixture(scope="module")
def sequential(torch, batches):
    """A trained-looking nn.Sequential: random weights, running stats moved by a batch."""
    torch.manual_seed(0)
    seq = sequential_mlp(torch)
    with torch.no_grad():
        seq.train()(torch.as_tensor(batches[0][0]))
    return seq


def test_a_sequential_state_dict_imports_with_a_key_map(torch, sequential, batches):
    model = SEQUENTIAL_MODEL
    sequential = copy.deepcopy(sequential)  # its training pass below moves running stats
    state = {k: v.clone() for k, v in sequential.state_dict().items()}
    variables = tb.state_dict_to_variables(state, model, SEQUENTIAL_MAP)
    with_collections = {k: ("batch_stats/" if "running" in k else "params/") + v
                        for k, v in SEQUENTIAL_MAP.items()}
    assert_same_variables(tb.state_dict_to_variables(state, model, with_collections), variables)
    X = torch.as_tensor(batches[3][0])
    for train in (False, True):
        logits, _ = model.apply(variables, jnp.asarray(X.numpy()), train=train,
                                mutable=["batch_stats"])
        ref = sequential.train(train)(X).detach().numpy()
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5)
    # The same state_dict through torch_module's keys: the values are the Sequential's, exactly.
    sd = tb.variables_to_state_dict(variables, model)
    inverse = {path: key for key, path in SEQUENTIAL_MAP.items()}
    for key, path in tb.state_dict_keys(model).items():
        assert np.array_equal(sd[key].numpy(), state[inverse[path]].numpy())


def test_a_callable_key_map_imports_a_deep_sequential(torch, batches):
    """nn.Sequential(Embedding, Flatten, *layers): layer i is the Sequential's i + 2."""
    model = DeepMLP(VOCAB, **DISTINCT, depth=2, norm="layernorm", activation="relu")
    reference = tb.torch_module(model)  # torch's own init
    seq = torch.nn.Sequential(reference.embed, torch.nn.Flatten(), *reference.layers)
    names = dict(enumerate(model.layer_names))

    def key_map(key):  # "3.weight" -> "ln1/scale"
        index, torch_name = key.split(".")
        if index == "0":
            return "embed/embedding"
        name = names[int(index) - 2]
        if torch_name == "weight":
            return f"{name}/{'scale' if name.startswith('ln') else 'kernel'}"
        return f"{name}/bias"

    variables = tb.state_dict_to_variables(seq.state_dict(), model, key_map)
    X = batches[3][0]
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(X)),
                               seq(torch.as_tensor(X)).detach().numpy(), rtol=0, atol=1e-5)


def test_a_state_dict_of_any_flax_model_with_its_variables_as_template(torch):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="fc2")(jax.nn.relu(nn.Dense(8, name="fc1")(x)))

    torch.manual_seed(1)
    seq = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    template = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 5)))
    key_map = {"0.weight": "fc1/kernel", "0.bias": "fc1/bias", "2.weight": "fc2/kernel",
               "2.bias": ("params", "fc2", "bias")}  # the collection may be spelled out
    variables = tb.state_dict_to_variables(seq.state_dict(), template, key_map)
    assert set(variables) == {"params"}
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(Net().apply(variables, x),
                               seq(torch.as_tensor(x)).detach().numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="needs key_map="):
        tb.state_dict_to_variables(seq.state_dict(), template)
    with pytest.raises(ConfigError, match="builds jaxmlp's MLP and DeepMLP, got Net"):
        tb.torch_module(Net())


def test_imported_variables_are_copies(torch, sequential):
    """torch's optimizers update tensors in place; imported variables must not follow."""
    sd = {k: v.clone() for k, v in sequential.state_dict().items()}
    variables = tb.state_dict_to_variables(sd, SEQUENTIAL_MODEL, SEQUENTIAL_MAP)
    before = jax.tree.map(np.array, variables)
    for v in sd.values():
        v.add_(1)
    assert_same_variables(variables, before)
    # bfloat16 tensors (numpy has no such dtype) come over as their float32 values.
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    variables = tb.state_dict_to_variables(half, SEQUENTIAL_MODEL, SEQUENTIAL_MAP)
    np.testing.assert_array_equal(variables["params"]["bn"]["scale"],
                                  half["3.weight"].float().numpy())


def one_line_error(state_dict, key_map, model=SEQUENTIAL_MODEL) -> str:
    with pytest.raises(ConfigError) as e:
        tb.state_dict_to_variables(state_dict, model, key_map)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_key_maps_give_one_line_errors_naming_the_key(torch, sequential):
    sd = sequential.state_dict()
    # A path the model does not have: the key, the path, and the real paths.
    msg = one_line_error(sd, {**SEQUENTIAL_MAP, "3.running_var": "bn/std"})
    assert "'3.running_var' to 'bn/std'" in msg and "bn/var" in msg
    # A running variance into the lecture preset's running std, and the same, converted.
    lecture = MLP(VOCAB, **DISTINCT, batchnorm=True)
    msg = one_line_error(sd, {**SEQUENTIAL_MAP, "3.running_var": "bn/std"}, lecture)
    assert "'3.running_var' (a running var) to bn/std, a running std" in msg
    assert "'3.running_std'" in msg
    converted = {**sd, "3.running_std": sd["3.running_var"].sqrt()}
    variables = tb.state_dict_to_variables(converted, lecture, {
        **SEQUENTIAL_MAP, "3.running_var": None, "3.running_std": "bn/std"})
    assert np.array_equal(variables["batch_stats"]["bn"]["std"], converted["3.running_std"])
    # Swapped Linear weights: the key and both shapes, in torch's (out, in) layout.
    msg = one_line_error(sd, {**SEQUENTIAL_MAP, "2.weight": "out/kernel",
                              "5.weight": "hidden/kernel"})
    assert re.search(r"key '(2|5)\.weight' has shape \((16, 12|27, 16)\), but "
                     r"(out|hidden)/kernel needs \((27, 16|16, 12)\) \(a Linear weight is "
                     r"\(out, in\)", msg), msg
    # A vector where a vector of another size belongs.
    msg = one_line_error(sd, {**SEQUENTIAL_MAP, "3.bias": "out/bias", "5.bias": "bn/bias"})
    assert re.search(r"'(3|5)\.bias' has shape \((16|27),\), but (out|bn)/bias needs", msg)
    # Two keys for one variable.
    msg = one_line_error(sd, {**SEQUENTIAL_MAP, "3.weight": "bn/bias"})
    assert "both '3.weight' and '3.bias'" in msg or "both '3.bias' and '3.weight'" in msg
    # Keys the map leaves out: every one listed, and what is left unfilled.
    partial = {k: v for k, v in SEQUENTIAL_MAP.items() if k not in ("3.weight", "5.bias")}
    msg = one_line_error(sd, partial)
    assert "['3.weight', '5.bias']" in msg and "['bn/scale', 'out/bias']" in msg
    # A map naming keys this state_dict lacks.
    msg = one_line_error(sd, {**partial, "3.gamma": "bn/scale", "5.b": "out/bias"})
    assert "['3.gamma', '5.b']" in msg
    # Not a path; not a map; not a state_dict.
    assert "'0.weight' to 3" in one_line_error(sd, {**SEQUENTIAL_MAP, "0.weight": 3})
    assert "dict or a callable" in one_line_error(sd, ["0.weight"])
    assert "pass module.state_dict()" in one_line_error(list(sd.items()), SEQUENTIAL_MAP)
    # A callable that does not know a key (KeyError) leaves it unmatched.
    msg = one_line_error(sd, lambda k: {**SEQUENTIAL_MAP, "0.weight": None}[k])
    assert "nothing fills ['embed/embedding']" in msg
    # A key sent to None is skipped; num_batches_tracked needs no entry.
    assert "3.num_batches_tracked" in sd
    tb.state_dict_to_variables({**sd, "extra": sd["0.weight"]}, SEQUENTIAL_MODEL,
                               {**SEQUENTIAL_MAP, "extra": None})
    # Without a key map a foreign state_dict names its keys and says how to map them.
    msg = one_line_error(sd, None)
    assert "'0.weight'" in msg and "embed/embedding" in msg and "key_map=" in msg


# ---------------------------------------------------------------------------------------------
# experiments/kaiming_relu.py


def test_kaiming_relu_experiment_runs(kaiming_run):
    pytest.importorskip("torch")  # the experiment compares with torch
    proc, out_dir = kaiming_run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert "initial weight std matches sqrt(2/fan_in): yes" in stdout
    diff = float(re.search(r"largest relative loss difference over 20 Adam steps: (\S+) in "
                           r"float64", stdout).group(1))
    assert diff <= 1e-4
    # float32: the curves start together (Adam's amplified rounding parts them later).
    first = float(re.search(r"first 5 steps: (\S+)\)", stdout).group(1))
    assert first <= 1e-5
    result = json.loads((out_dir / "kaiming-relu.json").read_text())
    assert result["steps"] == 20 and result["init_ok"] is True
    assert result["max_rel_loss_diff"]["float64"] == pytest.approx(diff, rel=1e-2)
    assert {len(v) for v in result["losses"].values()} == {20}
    assert (out_dir / "kaiming-relu.png").stat().st_size > 10_000
