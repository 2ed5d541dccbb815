"""The bridge to the PyTorch lecture: its exact initial tensors and minibatch stream, and weights
converted both ways between PyTorch and Flax.

    lecture_init          the lecture's torch.Generator draws: C, W1, b1 (if any), W2, b2
    lecture_batches       its minibatch indices, one torch.randint per step -> (steps, B) int32
    lecture_train_state   a TrainState that starts where the lecture starts
    lecture_stream        both at once: (TrainState, batch_ix) for `train.fit(..., batch_ix=)`
    tensors_to_variables / variables_to_tensors        the lecture's names C, W1, ..., bnstd_running
    state_dict_to_variables / variables_to_state_dict  an nn.Module state_dict (see torch_module)
    torch_module          that nn.Module: Embedding -> Linear -> [BatchNorm1d] -> tanh -> Linear
    lecture_train, lecture_split_loss   the lecture's own PyTorch loop, for comparisons
    lecture_train_deep, lecture_split_loss_deep   the same for the deep network, with the
                          lecture's Linear / BatchNorm1d / Tanh classes

lecture_init, lecture_batches, lecture_train_state, lecture_stream and the tensor conversions
also take the deep network (`models.DeepMLP`, stages deep and deep-nobn), whose tensors
carry the names of the lecture's `layers` list:
`C`, `layers.{i}.weight`/`.bias` (Linear, (in, out)), `layers.{i}.gamma`/`.beta`/
`.running_mean`/`.running_var` (its BatchNorm1d class) <-> params/linear{i}/kernel, bias,
params/bn{i}/scale, bias, batch_stats/bn{i}/mean, var.

torch is imported inside the functions only: `import jaxmlp` never imports it, and without it
these functions raise TorchNotInstalledError (one line, with the install command).

Lecture names <-> Flax variables of `models.MLP` (shapes for the lecture's sizes):

    C               (27, 10)     params/embed/embedding
    W1, b1          (30, 200)    params/hidden/kernel, bias     W1 is (in, out), like Flax
    bngain, bnbias  (1, 200)     params/bn/scale, bias          Flax keeps them (200,)
    bnmean_running  (1, 200)     batch_stats/bn/mean
    bnstd_running   (1, 200)     batch_stats/bn/std     (bnvar_running <-> bn/var for the
                                                          variance presets)
    W2, b2          (200, 27)    params/out/kernel, bias

state_dict keys (torch_module's): embed.weight, hidden.weight (out, in: the TRANSPOSE of the
kernel), hidden.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
bn.num_batches_tracked, out.weight (out, in), out.bias. A running std (the "lecture" preset)
travels as running_var = std**2; float32 sqrt(std**2) == std, so the round trip stays exact.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmlp.errors import ConfigError, JaxmlpError
from jaxmlp.models import BN_PRESETS, MLP, DeepMLP
from jaxmlp.stages import TANH_GAIN, Schedule
from jaxmlp.train import TrainConfig, TrainState, make_optimizer

LECTURE_SEED = 2147483647  # torch.Generator().manual_seed(2147483647) in the lecture
INSTALL_HINT = ("PyTorch is not installed; run `pip install torch==2.13.0`, then install jaxmlp "
                "with its torch extra (`pip install -e '.[torch]'`)")


class TorchNotInstalledError(JaxmlpError, ImportError):
    """A PyTorch comparison was asked for but `import torch` fails."""


def import_torch():
    """`import torch`, or a one-line TorchNotInstalledError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(INSTALL_HINT) from None
    return torch


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


def _layer_index(name: str) -> int:
    """'linear15' -> 15: DeepMLP names its layers after their index in the lecture's list."""
    return int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))


def _stat_name(model: MLP) -> str:
    """Lecture name of the running spread statistic: bnstd_running or bnvar_running."""
    return "bnstd_running" if BN_PRESETS[model.bn_semantics].stat == "std" else "bnvar_running"


# ---------------------------------------------------------------------------------------------
# The lecture's initial tensors and minibatch stream


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
        if scale == TANH_GAIN / math.sqrt(fan_in):
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
    """The deep network's tensors as the lecture makes them (REFERENCE.md, "The deep network").

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
        i = _layer_index(name)
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
    last = _layer_index(names[-1])
    t[f"layers.{last}.{'gamma' if m.batchnorm else 'weight'}"] *= m.last_scale
    for name in names[:-1]:
        if name.startswith("linear"):
            t[f"layers.{_layer_index(name)}.weight"] *= m.gain
    return t


def lecture_batches(generator, n: int, steps: int, batch_size: int = 32) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Conversions


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def _template(model: MLP) -> dict:
    """Shapes of the model's Flax variables, without running anything."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, model.block_size), jnp.int32)))


def _flax_leaf(value, shape_struct, where: str, source: str) -> jax.Array:
    arr = _to_numpy(value)
    shape = tuple(shape_struct.shape)
    if arr.shape not in (shape, (1, *shape)):  # (1, H): the lecture's bngain etc.
        raise ConfigError(f"{source} has shape {tuple(arr.shape)}, but {where} needs "
                          f"{shape}; build the model with the sizes the tensors were made for "
                          "(W1 and W2 are (in, out))")
    return jnp.asarray(arr.reshape(shape), dtype=shape_struct.dtype)


def _lecture_paths(model: MLP | DeepMLP) -> dict[str, tuple[str, str, str]]:
    """Lecture name -> (collection, module, variable) of the Flax variables."""
    if isinstance(model, DeepMLP):
        paths = {"C": ("params", "embed", "embedding")}
        for name in model.layer_names:
            i = _layer_index(name)
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
    template = _template(m)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for name, (col, mod, var) in paths.items():
        out[col].setdefault(mod, {})[var] = _flax_leaf(
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


def _state_dict_paths(model: MLP) -> dict[str, tuple[str, str, str, bool]]:
    """state_dict key -> (collection, module, variable, transposed)."""
    paths = {"embed.weight": ("params", "embed", "embedding", False),
             "hidden.weight": ("params", "hidden", "kernel", True)}
    if not model.batchnorm:
        paths["hidden.bias"] = ("params", "hidden", "bias", False)
    else:
        stat = BN_PRESETS[model.bn_semantics].stat
        paths |= {"bn.weight": ("params", "bn", "scale", False),
                  "bn.bias": ("params", "bn", "bias", False),
                  "bn.running_mean": ("batch_stats", "bn", "mean", False),
                  "bn.running_var": ("batch_stats", "bn", stat, False)}
    paths |= {"out.weight": ("params", "out", "kernel", True),
              "out.bias": ("params", "out", "bias", False)}
    return paths


def state_dict_to_variables(state_dict: dict, model: nn.Module) -> dict:
    """A `torch_module(model)` state_dict -> Flax variables (Linear weights transposed).

    `bn.num_batches_tracked` is ignored (Flax keeps no counter). For the "lecture" preset the
    running std is sqrt(running_var).
    """
    m = check_model(model, deep=False)
    paths = _state_dict_paths(m)
    keys = set(state_dict) - {"bn.num_batches_tracked"}
    if keys != set(paths):
        missing, extra = sorted(set(paths) - keys), sorted(keys - set(paths))
        raise ConfigError(f"the state_dict does not fit this model (missing {missing}, "
                          f"unexpected {extra}); save it from jaxmlp.torch_bridge.torch_module")
    template = _template(m)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, (col, mod, var, transposed) in paths.items():
        arr = _to_numpy(state_dict[key])
        if transposed:
            arr = arr.T
        if var == "std":
            arr = np.sqrt(arr.astype(np.float32))
        out[col].setdefault(mod, {})[var] = _flax_leaf(arr, template[col][mod][var],
                                                        f"{col}/{mod}/{var}", key)
    return out


def variables_to_state_dict(variables: dict, model: nn.Module,
                            num_batches_tracked: int = 0) -> OrderedDict:
    """Flax variables -> a state_dict that `torch_module(model).load_state_dict` accepts."""
    torch = import_torch()
    m = check_model(model, deep=False)
    out = OrderedDict()
    for key, (col, mod, var, transposed) in _state_dict_paths(m).items():
        arr = np.array(variables[col][mod][var])
        if var == "std":
            arr = np.square(arr)
        out[key] = torch.from_numpy(np.ascontiguousarray(arr.T if transposed else arr))
    if m.batchnorm:
        out["bn.num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return out


def torch_module(model: nn.Module):
    """The model as a torch nn.Module (state_dict keys as `variables_to_state_dict`).

    Embedding -> flatten -> Linear -> [BatchNorm1d] -> tanh -> Linear. The batch norm is
    torch.nn.BatchNorm1d with the preset's epsilon and momentum, so training-mode outputs match
    the Flax model only for the "torch" preset (the others differ in variance/epsilon: see
    models.BN_PRESETS); eval-mode outputs match for every var preset.
    """
    torch = import_torch()
    m = check_model(model, deep=False)
    spec = BN_PRESETS[m.bn_semantics]

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(m.vocab_size, m.n_embd)
            self.hidden = torch.nn.Linear(m.block_size * m.n_embd, m.n_hidden,
                                          bias=not m.batchnorm)
            self.bn = (torch.nn.BatchNorm1d(
                m.n_hidden, eps=spec.epsilon or 1e-5,
                momentum=spec.momentum if m.bn_momentum is None else m.bn_momentum)
                if m.batchnorm else None)
            self.out = torch.nn.Linear(m.n_hidden, m.vocab_size)

        def forward(self, idx):  # (B, block_size) int -> (B, vocab_size) logits
            h = self.hidden(self.embed(idx).flatten(1))
            if self.bn is not None:
                h = self.bn(h)
            return self.out(torch.tanh(h))

    return TorchMLP()


# ---------------------------------------------------------------------------------------------
# The lecture's own PyTorch loop (the reference every comparison runs against)


def lecture_train(tensors: dict, generator, X, Y, steps: int, schedule: Schedule | None = None,
                  batch_size: int = 32, num_threads: int | None = 1,
                  log: Callable[[int, float], None] | None = None):
    """The lecture's training loop in PyTorch, transcribed; returns (losses, tensors).

    tensors: from `lecture_init` (the lecture's names; batch norm when "bngain" is present,
    with the hand-written semantics: unbiased std, no epsilon, 0.999/0.001 running std).
    generator: continues the stream (each step draws its own torch.randint, as the lecture).
    X (N, T), Y (N,): the training split. losses: (steps,) float32, every step's loss.
    The input tensors are left alone: the loop trains copies and returns them. `num_threads`
    (the lecture's figures use 1) is set for the loop and restored after.
    """
    torch = import_torch()
    schedule = schedule or Schedule()
    t = {k: v.detach().clone() for k, v in tensors.items()}
    batchnorm = "bngain" in t
    if batchnorm and "bnstd_running" not in t:
        raise ConfigError("the lecture loop implements its hand-written batch norm (running "
                          "std); use a model with bn_semantics='lecture'")
    C, W1, W2, b2 = t["C"], t["W1"], t["W2"], t["b2"]
    if batchnorm:
        bngain, bnbias = t["bngain"], t["bnbias"]
        parameters = [C, W1, W2, b2, bngain, bnbias]
    else:
        b1 = t["b1"]
        parameters = [C, W1, b1, W2, b2]

    def forward(Xb):  # (B, T) -> logits (B, vocab), as the lecture's cell
        emb = C[Xb]  # embed the characters into vectors
        embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
        if batchnorm:
            hpreact = embcat @ W1  # hidden layer pre-activation (b1 dropped)
            bnmeani = hpreact.mean(0, keepdim=True)
            bnstdi = hpreact.std(0, keepdim=True)
            hpreact = bngain * (hpreact - bnmeani) / bnstdi + bnbias
            with torch.no_grad():
                t["bnmean_running"] = 0.999 * t["bnmean_running"] + 0.001 * bnmeani
                t["bnstd_running"] = 0.999 * t["bnstd_running"] + 0.001 * bnstdi
        else:
            hpreact = embcat @ W1 + b1  # hidden layer pre-activation
        h = torch.tanh(hpreact)  # hidden layer
        return h @ W2 + b2  # output layer

    on_step = None if log is None else lambda i, lr, loss: log(i, loss)
    lossi = _lecture_loop(torch, parameters, forward, generator, X, Y, steps, schedule,
                          batch_size, num_threads, on_step)
    return lossi, t


def _lecture_loop(torch, parameters: list, forward, generator, X, Y, steps: int,
                  schedule: Schedule, batch_size: int, num_threads: int | None,
                  on_step: Callable[[int, float, float], None] | None) -> np.ndarray:
    """The lecture's training loop around `forward` (its minibatch draw, cross-entropy,
    backward and `p.data += -lr * p.grad`); trains `parameters` in place, returns the
    (steps,) float32 losses. `on_step(i, lr, loss)` runs after each update."""
    import torch.nn.functional as F

    Xtr, Ytr = torch.as_tensor(np.asarray(X, np.int64)), torch.as_tensor(np.asarray(Y, np.int64))
    for p in parameters:
        p.requires_grad = True
    lossi = np.empty(steps, np.float32)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        for i in range(steps):
            # minibatch construct
            ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=generator)
            Xb, Yb = Xtr[ix], Ytr[ix]  # batch X,Y
            loss = F.cross_entropy(forward(Xb), Yb)  # forward pass, loss function
            # backward pass
            for p in parameters:
                p.grad = None
            loss.backward()
            # update (the lecture: lr = 0.1 if i < 100000 else 0.01)
            lr = schedule.learning_rates[bisect.bisect_right(schedule.boundaries, i)]
            for p in parameters:
                p.data += -lr * p.grad
            lossi[i] = loss.item()
            if on_step is not None:
                on_step(i, lr, lossi[i])
    finally:
        torch.set_num_threads(threads)
    for p in parameters:
        p.requires_grad = False
    return lossi


def lecture_split_loss(tensors: dict, X, Y) -> float:
    """The lecture's `split_loss`: eval-mode loss with the running batch-norm statistics."""
    torch = import_torch()
    import torch.nn.functional as F

    t = tensors
    x, y = torch.as_tensor(np.asarray(X, np.int64)), torch.as_tensor(np.asarray(Y, np.int64))
    with torch.no_grad():
        emb = t["C"][x]  # (N, block_size, n_embd)
        embcat = emb.view(emb.shape[0], -1)  # concat into (N, block_size * n_embd)
        if "bngain" in t:
            hpreact = embcat @ t["W1"]
            hpreact = (t["bngain"] * (hpreact - t["bnmean_running"]) / t["bnstd_running"]
                       + t["bnbias"])
        else:
            hpreact = embcat @ t["W1"] + t["b1"]
        h = torch.tanh(hpreact)
        logits = h @ t["W2"] + t["b2"]
        return F.cross_entropy(logits, y).item()


# ---------------------------------------------------------------------------------------------
# The deep network's PyTorch loop: the lecture's Linear / BatchNorm1d / Tanh classes


def _lecture_layers(tensors: dict, model: DeepMLP, torch):
    """The lecture's `layers` list over `tensors` (shared, not copied): callables x -> x."""

    class Linear:  # the lecture's: self.out = x @ self.weight (+= self.bias)
        def __init__(self, i):
            self.weight, self.bias = tensors[f"layers.{i}.weight"], tensors.get(f"layers.{i}.bias")

        def __call__(self, x):
            out = x @ self.weight
            if self.bias is not None:
                out += self.bias
            return out

    class BatchNorm1d:  # the lecture's: unbiased var, eps 1e-5, momentum 0.1, running var
        eps, momentum = 1e-5, 0.1

        def __init__(self, i):
            self.i, self.training = i, True
            self.gamma, self.beta = tensors[f"layers.{i}.gamma"], tensors[f"layers.{i}.beta"]

        def __call__(self, x):
            key = f"layers.{self.i}.running_"
            if self.training:
                xmean, xvar = x.mean(0, keepdim=True), x.var(0, keepdim=True)
            else:
                xmean, xvar = tensors[key + "mean"], tensors[key + "var"]
            out = self.gamma * ((x - xmean) / torch.sqrt(xvar + self.eps)) + self.beta
            if self.training:
                with torch.no_grad():
                    m = self.momentum
                    tensors[key + "mean"] = (1 - m) * tensors[key + "mean"] + m * xmean
                    tensors[key + "var"] = (1 - m) * tensors[key + "var"] + m * xvar
            return out

    make = {"linear": Linear, "bn": BatchNorm1d, "tanh": lambda i: torch.tanh}
    return [make[name.rstrip("0123456789")](_layer_index(name)) for name in model.layer_names]


def lecture_train_deep(tensors: dict, generator, X, Y, steps: int, model: nn.Module,
                       schedule: Schedule | None = None, batch_size: int = 32,
                       num_threads: int | None = 1, ud: bool = False):
    """The lecture's deep-network loop in PyTorch; returns (losses, tensors, ud).

    tensors: from `lecture_init(model)`; generator continues the stream (one torch.randint per
    step). losses (steps,) float32; ud: when asked, (steps, n_2d_params) float32, the lecture's
    `ud` list restricted to its plotted 2-D parameters, log10(std(lr * grad) / std(param)) in
    the order C, then each Linear weight (else None). The input tensors are left alone.
    """
    torch = import_torch()
    m = check_model(model)
    if not isinstance(m, DeepMLP):
        raise ConfigError("lecture_train_deep trains the deep network; use lecture_train for "
                          "the shallow MLP")
    schedule = schedule or Schedule((0.1, 0.01), (150_000,))
    t = {k: v.detach().clone() for k, v in tensors.items()}
    layers = _lecture_layers(t, m, torch)
    names = [k for k in t if not k.split(".")[-1].startswith("running")]  # C, then layer order
    parameters = [t[k] for k in names]
    matrices = [p for p in parameters if p.ndim == 2]

    def forward(Xb):
        emb = t["C"][Xb]
        x = emb.view(emb.shape[0], -1)
        for layer in layers:
            x = layer(x)
        return x

    udi = []

    def record_ud(i, lr, loss):
        with torch.no_grad():
            udi.append([((lr * p.grad).std() / p.data.std()).log10().item() for p in matrices])

    lossi = _lecture_loop(torch, parameters, forward, generator, X, Y, steps, schedule,
                          batch_size, num_threads, record_ud if ud else None)
    return lossi, t, np.array(udi, np.float32).reshape(steps, len(matrices)) if ud else None


def lecture_split_loss_deep(tensors: dict, X, Y, model: nn.Module) -> float:
    """The deep network's eval-mode loss with the lecture's classes (running statistics)."""
    torch = import_torch()
    import torch.nn.functional as F

    layers = _lecture_layers(dict(tensors), check_model(model), torch)
    for layer in layers:
        if hasattr(layer, "training"):
            layer.training = False
    x = torch.as_tensor(np.asarray(X, np.int64))
    with torch.no_grad():
        out = tensors["C"][x].view(x.shape[0], -1)
        for layer in layers:
            out = layer(out)
        return F.cross_entropy(out, torch.as_tensor(np.asarray(Y, np.int64))).item()
