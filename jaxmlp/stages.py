"""The lecture's stages as plain data: one `Stage` record each, the single source of truth.

A stage is a model (its class and fields), a learning-rate schedule, and the PyTorch lecture's
figures for it with the tolerance a run from the lecture's own tensors and minibatches
(`--torch-stream`) is held to (docs/reference.md). The five shallow stages differ only in how
the initial tensors are scaled:

    stage        W1                b1     W2     b2   batch norm   params (27 tokens)
    original     x1                x1     x1     x1   no           11,897
    softmax-fix  x1                x1     x0.01  x0   no           11,897
    tanh-fix     x0.2              x0.01  x0.01  x0   no           11,897
    kaiming      x(5/3)/sqrt(30)   x0.01  x0.01  x0   no           11,897
    batchnorm    x(5/3)/sqrt(30)   --     x0.01  x0   yes          12,097

and the deep network (`DeepMLP`):

    deep         5 x [Linear(no bias) -> BatchNorm1d -> Tanh], width 100,
                 Linear(no bias) -> BatchNorm1d with gamma x0.1; gain 1      47,024
    deep-nobn    5 x [Linear -> Tanh], gain 5/3, last Linear's weight x0.1  46,497
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from flax import linen as nn

from jaxmlp.errors import ConfigError
from jaxmlp.init import calculate_gain
from jaxmlp.models import MLP, DeepMLP
from jaxmlp.train import Schedule


@dataclass(frozen=True)
class Reference:
    """The PyTorch lecture's figures of a stage (None where it published none): the minibatch
    loss at step 0 and 10,000, and the final split losses with the running statistics.

    `tolerance`: how far the final losses of a `--torch-stream` run may lie from these (the
    chaotic `original` stage moves by ~0.003 from float summation order alone); the step-0
    loss, computed before any update, must agree to STEP0_TOLERANCE.
    """

    step0: float
    step10k: float | None
    train: float
    val: float
    test: float
    tolerance: float = 0.005
    seconds: float | None = None  # the PyTorch run's wall time (2 cores, 1 thread)

    def as_dict(self) -> dict[str, float | None]:
        return {"step 0": self.step0, "step 10,000": self.step10k, "train": self.train,
                "val": self.val, "test": self.test}


STEP0_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Stage:
    """A named model preset: `model(**fields)` at width `n_hidden`, trained on `schedule`."""

    name: str
    model: type[nn.Module]
    fields: dict = field(hash=False)
    n_hidden: int
    schedule: Schedule
    reference: Reference


_DEEP = Schedule((0.1, 0.01), (150_000,))  # the deep network decays later
_ALL = (
    Stage("original", MLP, dict(w1_scale=1.0, b1_scale=1.0, w2_scale=1.0, b2_scale=1.0), 200,
          Schedule(), Reference(27.8817, 2.8505, 2.1220, 2.1655, 2.1606, tolerance=0.02,
                                seconds=37)),
    Stage("softmax-fix", MLP, dict(w1_scale=1.0, b1_scale=1.0, w2_scale=0.01, b2_scale=0.0),
          200, Schedule(), Reference(3.3221, 2.1900, 2.0696, 2.1311, 2.1328, seconds=37)),
    Stage("tanh-fix", MLP, dict(w1_scale=0.2, b1_scale=0.01, w2_scale=0.01, b2_scale=0.0), 200,
          Schedule(), Reference(3.3135, 2.1648, 2.0356, 2.1027, 2.1012, seconds=37)),
    # w1_scale None: Kaiming's (5/3)/sqrt(fan_in), from the model's own sizes.
    Stage("kaiming", MLP, dict(w1_scale=None, b1_scale=0.01, w2_scale=0.01, b2_scale=0.0), 200,
          Schedule(), Reference(3.3179, 2.1910, 2.0377, 2.1070, 2.1050, seconds=37)),
    Stage("batchnorm", MLP, dict(w1_scale=None, w2_scale=0.01, b2_scale=0.0, batchnorm=True),
          200, Schedule(), Reference(3.3239, 2.0322, 2.0674, 2.1057, 2.1070, seconds=77)),
    Stage("deep", DeepMLP, dict(norm="batchnorm", gain=1.0, last_scale=0.1), 100, _DEEP,
          Reference(3.2870, None, 1.9999, 2.0771, 2.0811, seconds=289)),
    Stage("deep-nobn", DeepMLP, dict(norm="none", gain=calculate_gain("tanh"), last_scale=0.1),
          100, _DEEP, Reference(3.2962, None, 1.9626, 2.0865, 2.0882, seconds=108)),
)
# The lecture's five stages (what `reproduce` and `sweep` run by default) and its deep network.
STAGES: dict[str, Stage] = {s.name: s for s in _ALL if s.model is MLP}
DEEP_STAGES: dict[str, Stage] = {s.name: s for s in _ALL if s.model is DeepMLP}


def stage_names() -> list[str]:
    return [s.name for s in _ALL]


def get_stage(name: str) -> Stage:
    """The stage called `name`; ConfigError listing the stages otherwise."""
    for s in _ALL:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage {name!r}; choose one of {', '.join(stage_names())}")


# The deep network's variants, each a field of DeepMLP and a flag of train, sweep and diagnose.
VARIANTS = {"norm": "normalisation (batchnorm, layernorm or none)",
            "activation": "activation (tanh or relu)",
            "gain": "initial gain of its Linear weights", "depth": "number of hidden blocks"}


def _check_variants(fields: dict) -> None:
    """ConfigError for a variant value out of range (names: DeepMLP checks them itself)."""
    gain, depth = fields.get("gain"), fields.get("depth")
    if gain is not None and (isinstance(gain, bool) or not isinstance(gain, (int, float))
                             or not (math.isfinite(gain) and gain > 0)):
        raise ConfigError(f"--gain must be a positive finite number, got {gain!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                              or not 1 <= depth <= MAX_DEPTH):
        raise ConfigError(f"--depth must be a whole number of hidden blocks from 1 to "
                          f"{MAX_DEPTH}, got {depth!r}")


MAX_DEPTH = 100  # every block is unrolled into the compiled step


def make_model(stage: str, vocab_size: int, block_size: int = 3, n_embd: int = 10,
               n_hidden: int | None = None, **overrides) -> nn.Module:
    """The Flax module of a stage for the given sizes; `overrides` replace any model field.

    n_hidden None is the stage's width (200 for the shallow stages, 100 for the deep ones).
    """
    s = get_stage(stage)
    n_hidden = s.n_hidden if n_hidden is None else n_hidden
    for name, value in (("block_size", block_size), ("n_embd", n_embd), ("n_hidden", n_hidden),
                        ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    known = {f.name for f in dataclasses.fields(s.model)} - {"parent", "name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        if unknown[0] in VARIANTS:
            raise ConfigError(f"--{unknown[0]} sets the deep network's {VARIANTS[unknown[0]]}; "
                              f"stage {stage} is the shallow MLP, which has none (use --stage "
                              f"{' or '.join(DEEP_STAGES)})")
        raise ConfigError(f"{s.model.__name__} (stage {stage}) has no field {unknown[0]!r}; "
                          f"its fields are {', '.join(sorted(known))}")
    _check_variants(overrides)
    model = s.model(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd,
                    n_hidden=n_hidden, **{**s.fields, **overrides})
    eps = overrides.get("bn_epsilon")
    if eps is not None:
        if not model.batchnorm:
            raise ConfigError(f"--bn-epsilon sets batch norm's epsilon; stage {stage} has no "
                              "batch norm (use batchnorm or deep)")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
                math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"--bn-epsilon must be a finite number >= 0, got {eps!r}")
    return model
