"""The lecture's initialisation stages as named presets (configs as plain data).

Each stage is a set of `MLP` fields; they differ only in how the initial tensors are scaled
(REFERENCE.md, "The shallow model and its five stages"):

    stage        W1                b1     W2     b2   batch norm   params (27 tokens)
    original     x1                x1     x1     x1   no           11,897
    softmax-fix  x1                x1     x0.01  x0   no           11,897
    tanh-fix     x0.2              x0.01  x0.01  x0   no           11,897
    kaiming      x(5/3)/sqrt(30)   x0.01  x0.01  x0   no           11,897
    batchnorm    x(5/3)/sqrt(30)   --     x0.01  x0   yes          12,097

and the lecture's deep network (`DeepMLP`, REFERENCE.md "The deep network"), in DEEP_STAGES:

    deep         5 x [Linear(no bias) -> BatchNorm1d -> Tanh], width 100,
                 Linear(no bias) -> BatchNorm1d with gamma x0.1; gain 1      47,024
    deep-nobn    5 x [Linear -> Tanh], gain 5/3, last Linear's weight x0.1  46,497
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flax import linen as nn

from jaxmlp.errors import ConfigError
from jaxmlp.models import MLP, DeepMLP

TANH_GAIN = 5 / 3  # torch.nn.init.calculate_gain("tanh")
KAIMING = "kaiming"  # placeholder for (5/3)/sqrt(fan_in), resolved from the model's sizes

STAGES: dict[str, dict] = {
    "original": dict(w1_scale=1.0, b1_scale=1.0, w2_scale=1.0, b2_scale=1.0),
    "softmax-fix": dict(w1_scale=1.0, b1_scale=1.0, w2_scale=0.01, b2_scale=0.0),
    "tanh-fix": dict(w1_scale=0.2, b1_scale=0.01, w2_scale=0.01, b2_scale=0.0),
    "kaiming": dict(w1_scale=KAIMING, b1_scale=0.01, w2_scale=0.01, b2_scale=0.0),
    "batchnorm": dict(w1_scale=KAIMING, w2_scale=0.01, b2_scale=0.0, batchnorm=True),
}


@dataclass(frozen=True)
class Schedule:
    """Stepped learning rate: `learning_rates[i]` from step `boundaries[i-1]` on."""

    learning_rates: tuple[float, ...] = (0.1, 0.01)
    boundaries: tuple[int, ...] = (100_000,)


# DeepMLP fields of the deep network's presets (its defaults are the batch-norm run's).
DEEP_STAGES: dict[str, dict] = {
    "deep": dict(norm="batchnorm", gain=1.0, last_scale=0.1),
    "deep-nobn": dict(norm="none", gain=TANH_GAIN, last_scale=0.1),
}
DEFAULT_HIDDEN = {**{name: 200 for name in STAGES}, **{name: 100 for name in DEEP_STAGES}}

# Per-stage training defaults (the deep network of the lecture decays later).
SCHEDULES: dict[str, Schedule] = {
    **{name: Schedule() for name in STAGES},
    **{name: Schedule((0.1, 0.01), (150_000,)) for name in DEEP_STAGES},
}


def stage_names() -> list[str]:
    return [*STAGES, *DEEP_STAGES]


def check_stage(stage: str) -> None:
    if stage not in STAGES and stage not in DEEP_STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(stage_names())}")


def make_model(stage: str, vocab_size: int, block_size: int = 3, n_embd: int = 10,
               n_hidden: int | None = None, **overrides) -> nn.Module:
    """The Flax module of a stage for the given sizes; `overrides` replace any MLP field.

    n_hidden None is the stage's width (200 for the shallow stages, 100 for the deep ones).
    """
    check_stage(stage)
    if n_hidden is None:
        n_hidden = DEFAULT_HIDDEN[stage]
    if stage in DEEP_STAGES:
        _check_sizes(vocab_size, block_size, n_embd, n_hidden)
        return DeepMLP(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd,
                       n_hidden=n_hidden, **{**DEEP_STAGES[stage], **overrides})
    _check_sizes(vocab_size, block_size, n_embd, n_hidden)
    fields = dict(STAGES[stage])
    if fields.get("w1_scale") == KAIMING:
        fields["w1_scale"] = TANH_GAIN / math.sqrt(n_embd * block_size)
    fields.update(overrides)
    return MLP(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden,
               **fields)


def _check_sizes(vocab_size, block_size, n_embd, n_hidden) -> None:
    for name, value in (("block_size", block_size), ("n_embd", n_embd), ("n_hidden", n_hidden),
                        ("vocab_size", vocab_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
