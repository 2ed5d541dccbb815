"""The PyTorch lecture's exact start: its initial tensors, its minibatch stream, its names.

    lecture_init          the lecture's torch.Generator draws: C, W1, b1 (if any), W2, b2
    lecture_batches       its minibatch indices, one torch.randint per step -> (steps, B) int32
    lecture_train_state   a TrainState that starts where the lecture starts
    lecture_stream        both at once: (TrainState, batch_ix) for `train.fit(..., batch_ix=)`
    tensors_to_variables / variables_to_tensors   the lecture's names C, W1, ..., bnstd_running

They also take the deep network (`models.DeepMLP`, stages deep and deep-nobn), whose tensors
carry the names of the lecture's `layers` list:
`C`, `layers.{i}.weight`/`.bias` (Linear, (in, out)), `layers.{i}.gamma`/`.beta`/
`.running_mean`/`.running_var` (its BatchNorm1d class) <-> params/linear{i}/kernel, bias,
params/bn{i}/scale, bias, batch_stats/bn{i}/mean, var.

Lecture names <-> Flax variables of `models.MLP` (shapes for the lecture's sizes):

    C               (27, 10)     params/embed/embedding
    W1, b1          (30, 200)    params/hidden/kernel, bias     W1 is (in, out), like Flax
    bngain, bnbias  (1, 200)     params/bn/scale, bias          Flax keeps them (200,)
    bnmean_running  (1, 200)     batch_stats/bn/mean
    bnstd_running   (1, 200)     batch_stats/bn/std     (bnvar_running <-> bn/var for the
                                                          variance presets)
    W2, b2          (200, 27)    params/out/kernel, bias
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmlp.errors import ConfigError
from jaxmlp.models import BN_PRESETS, MLP, DeepMLP
from jaxmlp.torch_bridge.convert import flax_leaf, import_torch, variable_shapes
from jaxmlp.train import TrainConfig, TrainState, make_optimizer

LECTURE_SEED = 2147483647  # torch.Generator().manual_seed(2147483647) in the lecture


def check_model(model: nn.Module, deep: bool = True) -> MLP | DeepMLP:
    """The model, if the lecture's PyTorch code can express it (else a ConfigError)."""
    if isinstance(model, DeepMLP) and deep:
        lecture = (model.activation == "tanh" and model.norm in ("batchnorm", "none")
                   and model.use_bias is None and model.c_scale == 1.0
                   and (model.norm == "none" or (model.bn_semantics == "lecture-class"
                                                 and model.bn_momentum is None)))
        if not lecture:
            raise ConfigError("the lecture's deep network is Linear -> BatchNorm1d (its class: "
                              "unbiased variance, eps 1e-5, momentum 0.1) or Linear with bias, "
                              "then Tanh; the torch bridge replays DeepMLP only with activation "
                              "tanh, norm batchnorm or none, and the preset's batch norm")
        return model
    if not isinstance(model, MLP):
        raise ConfigError(f"the torch bridge handles the lecture's MLP"
                          f"{' and DeepMLP' if deep else ' here (use variables_to_tensors)'}, "
                          f"got {type(model).__name__}; build the model with stages.make_model")
    return model


def layer_index(name: str) -> int:
    """'linear15' -> 15: DeepMLP names its layers after their index in the lecture's list."""
    return int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))


def _stat_name(model: MLP) -> str:
    """Lecture name of the running spread statistic: bnstd_running or bnvar_running."""
    return "bnstd_running" if BN_PRESETS[model.bn_semantics].stat == "std" else "bnvar_running"


def lecture_init(model: nn.Module, seed: int = LECTURE_SEED):
    """Draw the lecture's initial tensors with its generator; returns (tensors, generator).

    Order and expressions as in the lecture: C, W1, b1 (not with batch norm), W2, b2, each
    `torch.randn(shape, generator=g) * scale` with the model's scales (b2's draw is made even
    though its scale is 0: it advances the generator). The Kaiming scale is applied as the
    lecture writes it, `* (5/3) / fan_in**0.5`, which rounds differently from one multiply by
    the product. Batch-norm tensors start at gain 1, bias 0, running mean 0, running std 1.
    The generator is returned positioned where the lecture's training loop starts drawing.
    """
    torch = import_torch()
    m = check_model(model)
    g = torch.Generator().manual_seed(seed)
    if isinstance(m, DeepMLP):
        return _lecture_init_deep(m, g, torch), g
    fan_in = m.n_embd * m.block_size

    def scaled(shape, scale):
        t = torch.randn(shape, generator=g)
        if scale is None:  # Kaiming for tanh
            return t * (5 / 3) / (fan_in ** 0.5)  # the lecture's two float32 roundings
        return t if scale == 1 else t * scale

    tensors = {"C": scaled((m.vocab_size, m.n_embd), m.c_scale),
               "W1": scaled((fan_in, m.n_hidden), m.w1_scale)}
    if not m.batchnorm:
        tensors["b1"] = scaled(m.n_hidden, m.b1_scale)
    tensors["W2"] = scaled((m.n_hidden, m.vocab_size), m.w2_scale)
    tensors["b2"] = scaled(m.vocab_size, m.b2_scale)
    if m.batchnorm:
        tensors["bngain"] = torch.ones((1, m.n_hidden))
        tensors["bnbias"] = torch.zeros((1, m.n_hidden))
        tensors["bnmean_running"] = torch.zeros((1, m.n_hidden))
        tensors[_stat_name(m)] = torch.ones((1, m.n_hidden))
    return tensors, g


def _lecture_init_deep(m: DeepMLP, g, torch) -> dict:
    """The deep network's tensors as the lecture makes them (docs/reference.md, "The deep network").

    C = randn(vocab, n_embd); then, layer by layer, Linear: `randn((fan_in, fan_out)) /
    fan_in**0.5` and a zero bias (no draw) when it has one; BatchNorm1d: gamma 1, beta 0,
    running mean 0, running var 1. Then, as the lecture's `with torch.no_grad()` block: the
    last layer made unconfident (`layers[-1].gamma *= 0.1`, or `.weight *= 0.1` without batch
    norm) and `weight *= gain` for every Linear of `layers[:-1]`.
    """
    t = {"C": torch.randn((m.vocab_size, m.n_embd), generator=g)}
    fan_in = m.n_embd * m.block_size
    names = m.layer_names
    for name in names:
        i = layer_index(name)
        if name.startswith("linear"):
            fan_out = m.vocab_size if name == names[-1] or name == names[-2] else m.n_hidden
            t[f"layers.{i}.weight"] = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
            if not m.batchnorm:
                t[f"layers.{i}.bias"] = torch.zeros(fan_out)
            fan_in = fan_out
        elif name.startswith("bn"):
            t[f"layers.{i}.gamma"], t[f"layers.{i}.beta"] = torch.ones(fan_in), torch.zeros(fan_in)
            t[f"layers.{i}.running_mean"] = torch.zeros(fan_in)
            t[f"layers.{i}.running_var"] = torch.ones(fan_in)
    last = layer_index(names[-1])
    t[f"layers.{last}.{'gamma' if m.batchnorm else 'weight'}"] *= m.last_scale
    for name in names[:-1]:
        if name.startswith("linear"):
            t[f"layers.{layer_index(name)}.weight"] *= m.gain
    return t


def lecture_batches(generator, n: int, steps: int,
                    batch_size: int = TrainConfig.batch_size) -> np.ndarray:
    """The lecture's minibatch indices: (steps, batch_size) int32, row i = step i's batch.

    Equal to `torch.randint(0, n, (batch_size,), generator=g)` called once per step, and
    leaves `generator` in the same state. Drawn in one call (PyTorch's CPU randint consumes the
    generator element by element, so one long draw is the per-step draws back to back; the
    tests check it): 200,000 steps take a fraction of a second instead of about one.
    """
    torch = import_torch()
    if steps < 0 or batch_size < 1 or n < 1:
        raise ConfigError(f"need n >= 1, steps >= 0, batch_size >= 1; got {n}, {steps}, "
                          f"{batch_size}")
    if n > np.iinfo(np.int32).max:
        raise ConfigError(f"{n:,} training examples do not fit int32 indices; use fewer")
    ix = torch.randint(0, n, (steps * batch_size,), generator=generator)
    return ix.view(steps, batch_size).numpy().astype(np.int32)


def lecture_train_state(model: nn.Module, config: TrainConfig, seed: int = LECTURE_SEED):
    """(TrainState holding the lecture's initial variables, the generator after the init)."""
    tensors, g = lecture_init(model, seed)
    variables = tensors_to_variables(tensors, model)
    # The key is unused (the batches come from the stream) but kept as create_train_state's
    # for key(0); building the state directly skips an eager init (seconds for DeepMLP).
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=make_optimizer(config).init(variables["params"]),
                       key=jax.random.split(jax.random.key(0))[1])
    return state, g


def lecture_stream(model: nn.Module, config: TrainConfig, n: int, seed: int = LECTURE_SEED):
    """The lecture's start and batches: (TrainState, batch_ix (config.steps, B) int32).

    `train.fit(state, X, Y, model, config, batch_ix=batch_ix)` then retraces the lecture.
    """
    state, g = lecture_train_state(model, config, seed)
    return state, lecture_batches(g, n, config.steps, config.batch_size)



def _lecture_paths(model: MLP | DeepMLP) -> dict[str, tuple[str, str, str]]:
    """Lecture name -> (collection, module, variable) of the Flax variables."""
    if isinstance(model, DeepMLP):
        paths = {"C": ("params", "embed", "embedding")}
        for name in model.layer_names:
            i = layer_index(name)
            if name.startswith("linear"):
                paths[f"layers.{i}.weight"] = ("params", name, "kernel")
                if not model.batchnorm:
                    paths[f"layers.{i}.bias"] = ("params", name, "bias")
            elif name.startswith("bn"):
                paths |= {f"layers.{i}.gamma": ("params", name, "scale"),
                          f"layers.{i}.beta": ("params", name, "bias"),
                          f"layers.{i}.running_mean": ("batch_stats", name, "mean"),
                          f"layers.{i}.running_var": ("batch_stats", name, "var")}
        return paths
    paths = {"C": ("params", "embed", "embedding"), "W1": ("params", "hidden", "kernel")}
    if not model.batchnorm:
        paths["b1"] = ("params", "hidden", "bias")
    paths |= {"W2": ("params", "out", "kernel"), "b2": ("params", "out", "bias")}
    if model.batchnorm:
        stat = BN_PRESETS[model.bn_semantics].stat
        paths |= {"bngain": ("params", "bn", "scale"), "bnbias": ("params", "bn", "bias"),
                  "bnmean_running": ("batch_stats", "bn", "mean"),
                  _stat_name(model): ("batch_stats", "bn", stat)}
    return paths


def tensors_to_variables(tensors: dict[str, Any], model: nn.Module) -> dict:
    """The lecture's tensors (by its names; torch tensors or arrays) -> Flax variables.

    Returns {"params": ..., "batch_stats": ...} for `model.apply`; values are copied exactly
    (cast to the model's float32). Missing or extra names, or wrong sizes, raise ConfigError.
    """
    m = check_model(model)
    paths = _lecture_paths(m)
    if set(tensors) != set(paths):
        missing, extra = sorted(set(paths) - set(tensors)), sorted(set(tensors) - set(paths))
        raise ConfigError(f"the tensors do not fit this model (missing {missing}, unexpected "
                          f"{extra}); pass exactly {list(paths)}")
    template = variable_shapes(m)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for name, (col, mod, var) in paths.items():
        out[col].setdefault(mod, {})[var] = flax_leaf(
            tensors[name], template[col][mod][var], f"{col}/{mod}/{var}", name)
    return out


def variables_to_tensors(variables: dict, model: nn.Module) -> dict:
    """Flax variables -> the lecture's tensors (torch float32, lecture shapes: bngain (1, H)).

    Parameters come back as leaf tensors without requires_grad; set it to train them.
    """
    torch = import_torch()
    m = check_model(model)
    out = {}
    for name, (col, mod, var) in _lecture_paths(m).items():
        arr = np.array(variables[col][mod][var])
        if name.startswith("bn"):
            arr = arr.reshape(1, -1)
        out[name] = torch.from_numpy(arr)
    return out


