"""Run directories: the spec that made a run, its checkpoint, its metrics.

    DIR/run.json           RunSpec: stage, seed, model fields, train config, vocabulary
    DIR/checkpoint.msgpack flax.serialization of the whole TrainState
    DIR/metrics.json       final losses, timings, step_losses
    DIR/loss.png           the loss curve

Every file is written to a temporary name and renamed, so a crash mid-write leaves the
previous version intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn
from flax import serialization

from jaxmlp import models
from jaxmlp.data import Vocab
from jaxmlp.errors import RunError
from jaxmlp.stages import Schedule
from jaxmlp.train import TrainConfig, TrainState, create_train_state

SPEC_FILE, CKPT_FILE, METRICS_FILE = "run.json", "checkpoint.msgpack", "metrics.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a run's model and optimizer (JSON-able)."""

    stage: str
    seed: int
    model: nn.Module
    train: TrainConfig
    vocab: Vocab
    data: str
    torch_stream: bool = False

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)
                  if f.name not in ("parent", "name")}
        return {
            "stage": self.stage, "seed": self.seed, "data": self.data,
            "torch_stream": self.torch_stream, "vocab": "".join(self.vocab.chars),
            "model": {"class": type(self.model).__name__, **fields},
            "train": {"steps": self.train.steps, "batch_size": self.train.batch_size,
                      "learning_rates": list(self.train.schedule.learning_rates),
                      "boundaries": list(self.train.schedule.boundaries),
                      "optimizer": self.train.optimizer, "chunk": self.train.chunk},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSpec:
        m = dict(d["model"])
        model = getattr(models, m.pop("class"))(**m)
        t = dict(d["train"])
        schedule = Schedule(tuple(t.pop("learning_rates")), tuple(t.pop("boundaries")))
        return cls(stage=d["stage"], seed=d["seed"], model=model,
                   train=TrainConfig(schedule=schedule, **t), vocab=Vocab(tuple(d["vocab"])),
                   data=d["data"], torch_stream=d.get("torch_stream", False))


def write_atomic(path: str | Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def state_to_bytes(state: TrainState) -> bytes:
    # Typed PRNG keys are not serialisable; store their raw uint32 data.
    return serialization.to_bytes(state.replace(key=jax.random.key_data(state.key)))


def state_from_bytes(template: TrainState, blob: bytes) -> TrainState:
    raw = serialization.from_bytes(template.replace(key=jax.random.key_data(template.key)), blob)
    return raw.replace(key=jax.random.wrap_key_data(raw.key))


def save_run(out: str | Path, spec: RunSpec, state: TrainState) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SPEC_FILE, spec.to_json())
    write_atomic(out / CKPT_FILE, state_to_bytes(state))


def load_run(run: str | Path) -> tuple[RunSpec, TrainState]:
    """Read a run directory written by `jaxmlp train`; raises RunError with the fix."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run directory {str(run)!r} does not exist; "
                       "pass --run DIR of a finished `jaxmlp train`")
    for name in (SPEC_FILE, CKPT_FILE):
        if not (run / name).is_file():
            raise RunError(f"{str(run / name)!r} is missing; "
                           "is this a run directory written by `jaxmlp train`?")
    try:
        spec = RunSpec.from_json(json.loads((run / SPEC_FILE).read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunError(f"{str(run / SPEC_FILE)!r} is corrupted ({type(e).__name__}); "
                       "re-run `jaxmlp train`") from None
    template = create_train_state(jax.random.key(spec.seed), spec.model, spec.train)
    try:
        state = state_from_bytes(template, (run / CKPT_FILE).read_bytes())
    except Exception as e:  # msgpack raises many types for a damaged file
        raise RunError(f"checkpoint {str(run / CKPT_FILE)!r} is unreadable "
                       f"({type(e).__name__}); re-run `jaxmlp train`") from None
    return spec, state
