"""The model protocol: what a `flax.linen` Module must provide for jaxmlp to train, checkpoint,
resume, evaluate, sample and diagnose it, checked in one place.

A module trains with jaxmlp when it has
    block_size                 the context length T of its input (an int field)
    __call__(idx, train)       idx (B, T) int32 tokens, train a bool -> logits (B, V) float,
                               V the vocabulary's size (a `vocab_size` field is checked if present)
    batch_stats                running statistics (batch norm), if any, in that collection and no
                               other mutable state; `bn_momentum` (the weight of the new value)
                               if it should calibrate them (`jaxmlp eval --calibrate`)
and, to be saved in a run directory and rebuilt by `jaxmlp eval/sample/train --resume`, it is a
class at the top level of an importable module whose fields are JSON values (numbers, strings,
booleans, None, lists). Diagnostics need, after each activation to be watched,

    self.sow("intermediates", name, x)
    x = jaxmlp.probe_point(self, name, x)

(and an `activation` attribute "relu" where saturation means t <= 0). The lecture's modules
(`jaxmlp.models`) are recorded by class name; every other by "package.module:ClassName".

    check_model        ConfigError naming the first missing piece
    has_batch_stats    whether a model keeps running statistics (the batch-size-1 check)
    model_to_json / model_from_json    a module as run.json records it, and back
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxmlp.errors import ConfigError, RunError

KEPT = ("params", "batch_stats")  # the collections a TrainState keeps
TRANSIENT = ("intermediates", "perturbations")  # the diagnostics' own, never kept


def _name(model) -> str:
    return type(model).__name__


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def check_model(model, vocab_size: int | None = None) -> nn.Module:
    """Refuse, with a ConfigError naming the missing piece, a model jaxmlp cannot train.

    vocab_size: when known (the data's), the width its logits must have.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model must be a flax.linen Module, got {type(model).__name__}")
    block_size = getattr(model, "block_size", None)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"{_name(model)} needs a positive int field block_size (the context "
                          f"length T of its (B, T) input), got {block_size!r}")
    for mode, collections in _shapes(model).items():
        if isinstance(collections, Exception):
            raise ConfigError(f"{_name(model)} cannot run on (2, {block_size}) int32 tokens with "
                              f"train={mode == 'train'} ({_first_line(collections)}); its "
                              "__call__ must take (idx, train) and return logits (B, V)")
        logits, variables = collections
        extra = sorted(set(variables) - set(KEPT) - set(TRANSIENT))
        if extra:
            raise ConfigError(f"{_name(model)} keeps state in the collection {extra[0]!r}; "
                              "jaxmlp keeps params and batch_stats only: put running "
                              "statistics in batch_stats")
        if logits.ndim != 2 or logits.shape[0] != 2 or not jnp.issubdtype(logits.dtype,
                                                                          jnp.floating):
            raise ConfigError(f"{_name(model)} returns {logits.dtype} of shape {logits.shape} "
                              f"for (2, {block_size}) tokens; it must return float logits (2, V)")
        if vocab_size is not None and logits.shape[1] != vocab_size:
            raise ConfigError(f"{_name(model)} returns {logits.shape[1]} logits per example but "
                              f"the names file has {vocab_size} tokens; set its vocab_size to "
                              f"{vocab_size}")
    return model


@functools.cache
def _shapes(model) -> dict[str, Any]:
    """{mode: (logits, collections) shapes, or the exception} for eval and training mode."""
    x = jnp.zeros((2, model.block_size), jnp.int32)
    out: dict[str, Any] = {}
    try:
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        out["eval"] = (jax.eval_shape(lambda v: model.apply(v, x, train=False), variables),
                       variables)
        kept = {k: v for k, v in variables.items() if k in KEPT}
        out["train"] = jax.eval_shape(lambda v: model.apply(v, x, train=True,
                                                            mutable=["batch_stats"]), kept)
        out["train"] = (out["train"][0], {**variables, **out["train"][1]})
    except Exception as e:  # whatever the user's module raises
        out.setdefault("eval", e)
        out["train"] = e
    return out


@functools.cache
def has_batch_stats(model: nn.Module) -> bool:
    """Whether `model` keeps running statistics (a non-empty batch_stats collection)."""
    shapes = _shapes(model)["eval"]
    if isinstance(shapes, Exception):
        return bool(getattr(model, "batchnorm", False))  # check_model will say what is wrong
    return bool(jax.tree.leaves(shapes[1].get("batch_stats", {})))


# ------------------------------------------------------------------------------- run.json


def class_path(cls: type) -> str:
    """How run.json names a model class: "MLP" for jaxmlp's own, else "module:QualName"."""
    from jaxmlp import models

    if getattr(models, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def model_fields(model: nn.Module) -> dict[str, Any]:
    """The module's dataclass fields as JSON values; a field left at a default that is not
    JSON (e.g. an initialiser function) is left out. ConfigError for any other."""
    out = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name)
        try:
            text = json.dumps(value)
            ok = _tuples(json.loads(text)) == _tuples(value)
        except (TypeError, ValueError):
            ok = False
        if ok:
            out[f.name] = value
        elif not (f.default is not dataclasses.MISSING and value is f.default):
            raise ConfigError(f"field {f.name} of {_name(model)} is {type(value).__name__}, "
                              "which run.json cannot record; give it a JSON value (number, "
                              "string, bool, None, list) or leave it at its default")
    return out


def model_to_json(model: nn.Module) -> dict[str, Any]:
    """{"class": class_path, **fields}: what run.json records of a model."""
    path = class_path(type(model))
    if "<locals>" in path:
        raise ConfigError(f"{_name(model)} is defined inside a function, so run.json could not "
                          "name it for eval, sample or --resume; define it at the top level "
                          "of a module")
    return {"class": path, **model_fields(model)}


def _tuples(x):
    """JSON lists back to tuples (hashable, as module fields must be)."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def import_class(path: str) -> type:
    """The class run.json names: "MLP" (jaxmlp.models) or "package.module:ClassName".

    RunError saying exactly what cannot be imported, and how to make it importable.
    """
    from jaxmlp import models

    if ":" not in path:
        cls = getattr(models, path, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"unknown model class {path!r}")
        return cls
    module, qualname = path.split(":", 1)
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # ImportError, or the module itself failing
        raise RunError(f"run.json names the model class {qualname} from module {module}, which "
                       f"cannot be imported here ({_first_line(e)}); install that package or "
                       "put its folder on PYTHONPATH") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise RunError(f"run.json names the model class {qualname} from module {module}, which "
                       f"has no such flax Module here; put back the version of {module} the "
                       "run was trained with (or put it on PYTHONPATH)")
    return obj


def model_from_json(d: dict[str, Any]) -> nn.Module:
    """Inverse of `model_to_json`."""
    fields = dict(d)
    cls = import_class(fields.pop("class"))
    return cls(**_tuples(fields))
