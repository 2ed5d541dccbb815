"""Flax <-> torch.nn: a jaxmlp model as a torch module, and its variables as a state_dict.

    torch_module(model)                 the model as a torch.nn.Module
    variables_to_state_dict / state_dict_to_variables    Flax variables <-> that module's
                                        state_dict (Linear weights transposed: torch keeps
                                        (out, in), Flax (in, out))
    import_torch                        `import torch`, or a one-line error saying how to install

torch is imported inside the functions only: `import jaxmlp` never imports it.

state_dict keys (torch_module's): embed.weight, hidden.weight (out, in: the TRANSPOSE of the
kernel), hidden.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
bn.num_batches_tracked, out.weight (out, in), out.bias. A running std (the "lecture" preset)
travels as running_var = std**2; float32 sqrt(std**2) == std, so the round trip stays exact.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmlp.errors import ConfigError, JaxmlpError
from jaxmlp.models import BN_PRESETS, MLP

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


def to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def variable_shapes(model: nn.Module) -> dict:
    """Shapes of the model's Flax variables, without running anything."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, model.block_size), jnp.int32)))


def flax_leaf(value, shape_struct, where: str, source: str) -> jax.Array:
    arr = to_numpy(value)
    shape = tuple(shape_struct.shape)
    if arr.shape not in (shape, (1, *shape)):  # (1, H): the lecture's bngain etc.
        raise ConfigError(f"{source} has shape {tuple(arr.shape)}, but {where} needs "
                          f"{shape}; build the model with the sizes the tensors were made for "
                          "(W1 and W2 are (in, out))")
    return jnp.asarray(arr.reshape(shape), dtype=shape_struct.dtype)



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
    m = _shallow(model)
    paths = _state_dict_paths(m)
    keys = set(state_dict) - {"bn.num_batches_tracked"}
    if keys != set(paths):
        missing, extra = sorted(set(paths) - keys), sorted(keys - set(paths))
        raise ConfigError(f"the state_dict does not fit this model (missing {missing}, "
                          f"unexpected {extra}); save it from jaxmlp.torch_bridge.torch_module")
    template = variable_shapes(m)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, (col, mod, var, transposed) in paths.items():
        arr = to_numpy(state_dict[key])
        if transposed:
            arr = arr.T
        if var == "std":
            arr = np.sqrt(arr.astype(np.float32))
        out[col].setdefault(mod, {})[var] = flax_leaf(arr, template[col][mod][var],
                                                        f"{col}/{mod}/{var}", key)
    return out


def variables_to_state_dict(variables: dict, model: nn.Module,
                            num_batches_tracked: int = 0) -> OrderedDict:
    """Flax variables -> a state_dict that `torch_module(model).load_state_dict` accepts."""
    torch = import_torch()
    m = _shallow(model)
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
    m = _shallow(model)
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




def _shallow(model: nn.Module) -> MLP:
    if not isinstance(model, MLP):
        raise ConfigError(f"the torch bridge handles the lecture's MLP here (use "
                          f"variables_to_tensors), got {type(model).__name__}; build the model "
                          "with stages.make_model")
    return model
