"""Flax <-> torch.nn: any jaxmlp model as a torch module, and its variables as a state_dict.

    torch_module(model, variables=None)   the model as a torch.nn.Module (modules.py)
    state_dict_keys(model)                that module's state_dict keys -> Flax variable paths
    variables_to_state_dict               Flax variables -> that module's state_dict
    state_dict_to_variables               a state_dict -> Flax variables: torch_module's own,
                                          or any torch model's with a key map saying which key
                                          is which Flax variable
    import_torch                          `import torch`, or a one-line error saying how to install

torch is imported inside the functions only: `import jaxmlp` never imports it.

Keys. `MLP`: embed.weight, hidden.weight, hidden.bias (no batch norm), bn.weight, bn.bias,
bn.running_mean, bn.running_var (bn.running_std for a running-std preset), out.weight,
out.bias. `DeepMLP`: embed.weight, then `layers.{i}.*` for layer i of `layer_names` (linear0 ->
layers.0.weight, bn1 -> layers.1.running_var, ln1 -> layers.1.weight, ...). Every Linear
weight is (out, in), the transpose of the Flax kernel (in, out); nothing else is reshaped or
rescaled, so a round trip is exact, bit for bit.

A Flax variable path is "module/variable" (e.g. "hidden/kernel", "bn/mean"); the collection
(params or batch_stats) may be written in front ("batch_stats/bn/mean") but is never needed
for jaxmlp's models.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxmlp.errors import ConfigError, JaxmlpError
from jaxmlp.models import MLP, BatchNorm1d, DeepMLP

INSTALL_HINT = ("PyTorch is not installed; run `pip install torch==2.13.0`, then install jaxmlp "
                "with its torch extra (`pip install -e '.[torch]'`)")

# Flax variable name -> the torch parameter or buffer that holds it, for every layer kind.
TORCH_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var", "std": "running_std"}
TORCH_ORDER = ("weight", "bias", "running_mean", "running_var", "running_std")

KeyMap = Mapping[str, "str | None"] | Callable[[str], "str | None"]


class TorchNotInstalledError(JaxmlpError, ImportError):
    """A PyTorch comparison was asked for but `import torch` fails."""


def import_torch():
    """`import torch`, or a one-line TorchNotInstalledError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(INSTALL_HINT) from None
    return torch


def to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def variable_shapes(model: nn.Module) -> dict:
    """Shapes of the model's Flax variables, without running anything."""
    return jax.tree.map(lambda s: s, _trace(model)[1])  # fresh dicts: callers may edit them


def flax_leaf(value, shape_struct, where: str, source: str) -> jax.Array:
    arr = to_numpy(value)
    shape = tuple(shape_struct.shape)
    if arr.shape not in (shape, (1, *shape)):  # (1, H): the lecture's bngain etc.
        raise ConfigError(f"{source} has shape {tuple(arr.shape)}, but {where} needs "
                          f"{shape}; build the model with the sizes the tensors were made for "
                          "(W1 and W2 are (in, out))")
    # A copy: jnp.asarray may alias a CPU tensor's memory, which torch then updates in place.
    return jnp.array(arr.reshape(shape), dtype=shape_struct.dtype, copy=True)


# ---------------------------------------------------------------------------------------------
# What the Flax model is made of


def _jaxmlp_model(model) -> MLP | DeepMLP:
    if not isinstance(model, (MLP, DeepMLP)):
        raise ConfigError(f"torch_module builds jaxmlp's MLP and DeepMLP, got "
                          f"{type(model).__name__}; for another model write its torch module "
                          "and import the state_dict with state_dict_to_variables(state_dict, "
                          "variables, key_map=...)")
    return model


def _trace(model: nn.Module) -> tuple[dict[str, nn.Module], dict]:
    """(the model's submodules by name, as its __call__ builds them; its variables' shapes).

    Read from an abstract init (nothing is computed), so every setting a submodule really gets
    (a batch norm's preset, momentum and epsilon overrides, a Dense's use_bias) is the one
    the torch layer is built with. Cached per model (a frozen dataclass: equal fields, equal
    model), as every conversion needs it; don't edit what it returns.
    """
    try:
        hash(model)
    except TypeError:  # a field that cannot be hashed: trace again each time
        return _trace_uncached(model)
    return _trace_cached(model)


def _trace_uncached(model: nn.Module) -> tuple[dict[str, nn.Module], dict]:
    submodules = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and len(module.path) == 1:
            submodules.setdefault(module.path[0], module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((2, model.block_size), jnp.int32)))
    return submodules, shapes


_trace_cached = functools.lru_cache(maxsize=64)(_trace_uncached)


def _torch_prefixes(model: MLP | DeepMLP) -> dict[str, str]:
    """Flax submodule (or activation) name -> its attribute path in the torch module."""
    if isinstance(model, DeepMLP):  # layers[i] is layer_names[i], the lecture's list
        return {"embed": "embed", **{name: f"layers.{i}"
                                     for i, name in enumerate(model.layer_names)}}
    return {name: name for name in ("embed", "hidden", "bn", "out")}


def state_dict_keys(model: nn.Module) -> dict[str, str]:
    """`torch_module(model)`'s state_dict keys -> Flax variable paths, in the module's order.

    E.g. {"embed.weight": "embed/embedding", "hidden.weight": "hidden/kernel", ...}: the key
    map `state_dict_to_variables` uses by default, and a template for writing one for another
    torch model. (`*.num_batches_tracked` has no Flax variable and is not listed.)
    """
    m = _jaxmlp_model(model)
    shapes = _trace(m)[1]
    keys = {}
    for module, prefix in _torch_prefixes(m).items():
        found = [(TORCH_NAMES[var], f"{module}/{var}") for col in ("params", "batch_stats")
                 for var in shapes.get(col, {}).get(module, {})]
        for torch_name, path in sorted(found, key=lambda f: TORCH_ORDER.index(f[0])):
            keys[f"{prefix}.{torch_name}"] = path
    return keys


# ---------------------------------------------------------------------------------------------
# The torch module


def torch_module(model: nn.Module, variables: dict | None = None):
    """The model as a torch.nn.Module; with `variables`, holding them (else torch's init).

    MLP -> modules.TorchMLP (embed, hidden, bn, out); DeepMLP -> modules.TorchDeepMLP (embed,
    layers: the lecture's list). Layers are torch.nn's Embedding, Linear, LayerNorm, Tanh and
    ReLU, and BatchNorm1d for the "torch" batch-norm semantics; the other presets get
    modules.VarianceBatchNorm1d (the lecture's class and Flax: Bessel's correction differs) or
    modules.StdBatchNorm1d (the lecture's running std). Each batch norm carries the Flax
    layer's own epsilon and momentum (the weight of the new value, as in torch), zero
    included. Train mode (batch statistics, running statistics updated) and eval mode compute
    what `model.apply(..., train=True / False)` computes, to float32 rounding.
    """
    torch = import_torch()
    from jaxmlp.torch_bridge import modules as tm

    m = _jaxmlp_model(model)
    submodules, shapes = _trace(m)

    def layer(name):
        return _torch_layer(name, submodules[name], shapes["params"][name])

    if isinstance(m, MLP):
        module = tm.TorchMLP(layer("embed"), layer("hidden"),
                             layer("bn") if "bn" in submodules else None, layer("out"))
    else:
        activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[m.activation]
        module = tm.TorchDeepMLP(layer("embed"), [
            layer(name) if name in submodules else activation() for name in m.layer_names])
    if variables is not None:
        module.load_state_dict(variables_to_state_dict(variables, m))
    return module


def _torch_layer(name: str, flax_module: nn.Module, params: dict):
    """The torch.nn layer computing what `flax_module` (named `name`) computes."""
    from jaxmlp.torch_bridge import modules as tm

    tnn = import_torch().nn
    if isinstance(flax_module, nn.Embed):
        return tnn.Embedding(flax_module.num_embeddings, flax_module.features)
    if isinstance(flax_module, nn.Dense):
        fan_in = params["kernel"].shape[0]
        return tnn.Linear(fan_in, flax_module.features, bias=flax_module.use_bias)
    features = params["scale"].shape[0] if "scale" in params else None
    if isinstance(flax_module, BatchNorm1d):
        spec = flax_module.spec
        eps = spec.epsilon if flax_module.epsilon is None else flax_module.epsilon
        momentum = spec.momentum if flax_module.momentum is None else flax_module.momentum
        if spec.stat == "std":
            return tm.StdBatchNorm1d(features, eps, momentum, spec.unbiased_norm,
                                     spec.unbiased_running)
        if not spec.unbiased_norm and spec.unbiased_running:  # torch.nn.BatchNorm1d's own
            return tnn.BatchNorm1d(features, eps=eps, momentum=momentum)
        return tm.VarianceBatchNorm1d(features, eps, momentum, spec.unbiased_norm,
                                      spec.unbiased_running)
    if isinstance(flax_module, nn.LayerNorm):
        axes_ok = flax_module.reduction_axes in (-1, (-1,)) and flax_module.feature_axes in (
            -1, (-1,))
        if axes_ok and flax_module.use_scale:
            # Flax's fast variance (E[x^2] - E[x]^2) and torch's differ by float rounding only.
            return tnn.LayerNorm(features, eps=flax_module.epsilon, bias=flax_module.use_bias)
    raise ConfigError(f"no torch.nn layer for the Flax {type(flax_module).__name__} {name!r} "
                      "(supported: Embed, Dense, BatchNorm1d, LayerNorm over the last axis with "
                      "a scale)")


# ---------------------------------------------------------------------------------------------
# Variables <-> state_dict


def variables_to_state_dict(variables: dict, model: nn.Module,
                            num_batches_tracked: int = 0) -> OrderedDict:
    """Flax variables -> a state_dict that `torch_module(model).load_state_dict` accepts.

    Keys as `state_dict_keys(model)`, Linear weights transposed to torch's (out, in); every
    nn.BatchNorm1d-based layer also gets `num_batches_tracked` (Flax keeps no counter).
    """
    torch = import_torch()
    m = _jaxmlp_model(model)
    shapes = _trace(m)[1]
    out = OrderedDict()
    for key, path in state_dict_keys(m).items():
        module, var = path.split("/")
        col = "batch_stats" if var in ("mean", "var", "std") else "params"
        try:
            arr = np.array(variables[col][module][var])
        except (KeyError, TypeError):
            raise ConfigError(f"the variables have no {col}/{path}; pass this model's "
                              "variables (model.init or a TrainState's .variables)") from None
        want = shapes[col][module][var].shape
        if arr.shape != want:
            raise ConfigError(f"{col}/{path} has shape {arr.shape}, but this model's is {want}; "
                              "pass the variables of the model they were made with")
        out[key] = torch.from_numpy(np.ascontiguousarray(arr.T if var == "kernel" else arr))
        if var == "var":  # nn.BatchNorm1d's counter follows its running_var
            out[f"{key.rsplit('.', 1)[0]}.num_batches_tracked"] = torch.tensor(
                num_batches_tracked, dtype=torch.long)
    return out


def state_dict_to_variables(state_dict: Mapping, model, key_map: KeyMap | None = None) -> dict:
    """A torch state_dict -> Flax variables ({"params": ..., "batch_stats": ...}).

    model: a jaxmlp MLP or DeepMLP; or the variables of any Flax model (`net.init(...)`, or
        `jax.eval_shape` of it), which give the structure and shapes to fill.
    key_map: which state_dict key is which Flax variable, for a state_dict of another torch
        model (e.g. an nn.Sequential): a dict {"0.weight": "embed/embedding", ...} or a callable
        key -> path ("module/variable", the collection optionally in front, or a tuple). A
        key it sends to None is skipped; a key it does not know (absent from the dict; the
        callable raises KeyError) is an error, unless it is a `num_batches_tracked`.
        Default (jaxmlp models only): `state_dict_keys(model)`, torch_module's own keys.

    A Flax kernel is the transpose of a Linear weight; nothing else is changed, so values come
    over exactly (cast to the model's dtype). Unmatched keys, variables no key fills, unknown
    paths and shape mismatches raise a one-line ConfigError naming the keys.
    """
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"expected a state_dict (a mapping of names to tensors), got "
                          f"{type(state_dict).__name__}; pass module.state_dict()")
    if isinstance(model, nn.Module):
        m = _jaxmlp_model(model)
        template = {"params": {}, "batch_stats": {}, **variable_shapes(m)}
        default = key_map is None
        key_map = state_dict_keys(m) if default else key_map
    else:
        if key_map is None:
            raise ConfigError("a state_dict for another Flax model needs key_map= (a dict or "
                              "callable: state_dict key -> 'module/variable')")
        template, default = model, False
    return _fill(template, state_dict, key_map, default)


def _fill(template, state_dict: Mapping, key_map: KeyMap, default: bool) -> dict:
    """`template`'s structure with each leaf taken from the state_dict key mapped to it."""
    flat = traverse_util.flatten_dict(dict(template))  # (collection, module, ..., var) -> leaf
    paths = {}  # every way to write a path -> its full tuple
    for full in flat:
        paths["/".join(full)] = full
        paths.setdefault("/".join(full[1:]), full)
    if isinstance(key_map, Mapping):
        lookup = key_map.__getitem__
    elif callable(key_map):
        lookup = key_map
    else:
        raise ConfigError(f"key_map must be a dict or a callable (state_dict key -> "
                          f"'module/variable'), got {type(key_map).__name__}")

    filled: dict[tuple, str] = {}  # full path -> the key filling it
    unmatched = []
    for key in state_dict:
        try:
            target = lookup(key)
        except KeyError:
            if not key.endswith("num_batches_tracked"):  # torch's counter: Flax keeps none
                unmatched.append(key)
            continue
        if target is None:  # skipped on purpose
            continue
        if isinstance(target, tuple):  # ("bn", "mean") as flax.traverse_util writes it
            target = "/".join(map(str, target))
        if not isinstance(target, str) or target not in paths:
            known = ", ".join(sorted({"/".join(p[1:]) for p in flat}))
            raise ConfigError(f"the key map sends {key!r} to {target!r}, which this model does "
                              f"not have; its variables are {known}")
        full = paths[target]
        spread = {"running_var": "var", "running_std": "std"}.get(key.rsplit(".", 1)[-1])
        if spread and full[-1] in ("var", "std") and full[-1] != spread:
            renamed = f"{key.rsplit('.', 1)[0]}.running_{full[-1]}"
            raise ConfigError(f"the key map sends {key!r} (a running {spread}) to "
                              f"{'/'.join(full[1:])}, a running {full[-1]}; convert it and "
                              f"store it as {renamed!r} (a std is the sqrt of a var), or build "
                              f"the model with a batch-norm preset that keeps a {spread}")
        if full in filled:
            raise ConfigError(f"the key map sends both {filled[full]!r} and {key!r} to "
                              f"{'/'.join(full[1:])}; map one key to each variable")
        filled[full] = key

    missing = ["/".join(p[1:]) for p in flat if p not in filled]
    if unmatched or missing:
        problems = []
        if unmatched:
            problems.append(f"no key-map entry for {unmatched} (map each to a variable, or to "
                            "None to skip it)")
        if missing:
            problems.append(f"nothing fills {missing}")
        if isinstance(key_map, Mapping):
            absent = [k for k in key_map if k not in state_dict]
            if absent:
                problems.append(f"the key map names keys the state_dict lacks: {absent}")
        fix = ("save it from torch_module(model), or pass key_map= to say which key is which"
               if default else "fix the key map, or build the model with the state_dict's "
               "layers")
        raise ConfigError(f"the state_dict does not fit the model: {'; '.join(problems)}; {fix}")

    out = {col: {} for col in template}  # keeps empty collections (batch_stats: {})
    leaves = {full: _leaf(state_dict[key], flat[full], key, full) for full, key in filled.items()}
    for col, tree in traverse_util.unflatten_dict(leaves).items():
        out[col] = tree
    return out


def _leaf(value, like, key: str, full: tuple) -> jax.Array:
    """One state_dict value as the Flax leaf `like` (a kernel is a Linear weight transposed)."""
    arr = to_numpy(value)
    want = tuple(like.shape)
    kernel = full[-1] == "kernel"
    if kernel and len(want) != 2:
        raise ConfigError(f"{'/'.join(full)} is a {len(want)}-D kernel; the bridge converts "
                          "Dense kernels (2-D) only")
    torch_shape = want[::-1] if kernel else want
    if arr.shape != torch_shape:
        layout = " (a Linear weight is (out, in), the Flax kernel's transpose)" if kernel else ""
        raise ConfigError(f"state_dict key {key!r} has shape {tuple(arr.shape)}, but "
                          f"{'/'.join(full[1:])} needs {torch_shape}{layout}; fix the key map, "
                          "or build the model with the sizes the state_dict was saved with")
    # A copy: jnp.asarray may alias a CPU tensor's memory, which torch then updates in place.
    return jnp.array(arr.T if kernel else arr, dtype=like.dtype, copy=True)
