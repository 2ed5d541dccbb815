"""The files of a run directory: its spec, its checkpoints, atomic writes.

    DIR/run.json           RunSpec: format marker, stage, seed, model fields, train config,
                           vocabulary, the names file (absolute path)
    DIR/checkpoint.msgpack the whole training state (see below), rewritten every chunk
    DIR/losses.npy         every step's minibatch loss (written when training ends)
    DIR/loss.png           the loss curve
    DIR/metrics.json       final losses, timings, step_losses; written last: it marks the run
                           finished

A checkpoint is flax.serialization msgpack, two levels deep so that damage is detected:

    {"format": "jaxmlp-checkpoint", "version": 1, "sha256": hex digest of payload,
     "payload": msgpack of {"spec": run.json's text, "state": TrainState (key as raw uint32
                            key data), "losses": (step,) float32, "data_sha256": hex digest of
                            the names file, "replaces": "" or the run dir this run replaces,
                            "replaces_fingerprint": that run's `fingerprint` when planned}}

It holds everything a resumed run needs (params, batch_stats, optimizer state, step, PRNG key,
the loss history and the spec), so a resumed run continues bit for bit. Every file is written
to a temporary name (created exclusively, never through a symlink), flushed to disk and renamed
over the old one: a crash or a failed write at any moment leaves the previous version whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import serialization

from jaxmlp import optim, protocol
from jaxmlp.data import END, Vocab
from jaxmlp.errors import DivergenceError, JaxmlpError, RunError
from jaxmlp.train import Schedule, TrainConfig, TrainState, all_finite, create_train_state

SPEC_FILE, CKPT_FILE, METRICS_FILE = "run.json", "checkpoint.msgpack", "metrics.json"
LOSSES_FILE, PLOT_FILE = "losses.npy", "loss.png"
RUN_FILES = (SPEC_FILE, CKPT_FILE, LOSSES_FILE, PLOT_FILE, METRICS_FILE)  # all jaxmlp writes
FORMAT, VERSION = "jaxmlp-checkpoint", 1
RUN_FORMAT, RUN_VERSION = "jaxmlp-run", 1


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a run's model and optimizer (JSON-able).

    The model is recorded by class ("MLP", or "package.module:ClassName" for a module of one's
    own: jaxmlp.protocol) and fields. A preset optimizer is recorded by name and schedule; a
    custom one (an optax transformation, or an optax schedule) as "custom" with the structure
    of its state and its fingerprint, and read back as a `RecordedOptimizer`: give the
    optimizer again to resume (`optim.with_optimizer`).
    """

    stage: str
    seed: int
    model: nn.Module
    train: TrainConfig
    vocab: Vocab
    data: str
    torch_stream: bool = False

    def to_json(self) -> dict[str, Any]:
        t = self.train
        train: dict[str, Any] = {"steps": t.steps, "batch_size": t.batch_size}
        if optim.is_custom(t):
            rec = t.optimizer if isinstance(t.optimizer, optim.RecordedOptimizer) else \
                optim.recorded(t, self.model)
            train.update(optimizer="custom", optimizer_state=rec.state,
                         optimizer_sha256=rec.sha256)
        else:
            train.update(learning_rates=list(t.schedule.learning_rates),
                         boundaries=list(t.schedule.boundaries), optimizer=t.optimizer)
        return {
            "format": RUN_FORMAT, "version": RUN_VERSION,
            "stage": self.stage, "seed": self.seed, "data": self.data,
            "torch_stream": self.torch_stream, "vocab": "".join(self.vocab.chars),
            "model": protocol.model_to_json(self.model), "train": {**train, "chunk": t.chunk},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSpec:
        """Inverse of `to_json`; ValueError/KeyError/TypeError for anything malformed, RunError
        when the model's class cannot be imported here."""
        if d.get("format") != RUN_FORMAT:
            raise ValueError("not a jaxmlp run.json")
        if d.get("version") != RUN_VERSION:
            raise ValueError(f"run.json version {d.get('version')!r}")
        model = protocol.model_from_json(d["model"])
        t = dict(d["train"])
        if t.get("optimizer") == "custom":
            t["optimizer"] = optim.RecordedOptimizer(str(t.pop("optimizer_state")),
                                                     str(t.pop("optimizer_sha256")))
        else:
            t["schedule"] = Schedule(tuple(t.pop("learning_rates")), tuple(t.pop("boundaries")))
        vocab = Vocab(tuple(d["vocab"]))
        if vocab.chars[:1] != (END,) or len(set(vocab.chars)) != vocab.size:
            raise ValueError("malformed vocabulary")
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            value = getattr(model, name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"malformed {name}")
        if getattr(model, "vocab_size", vocab.size) != vocab.size:
            raise ValueError("vocab_size does not match the vocabulary")
        train = TrainConfig(**t)
        train.validate(batchnorm=protocol.has_batch_stats(model))
        if not isinstance(d["seed"], int) or not isinstance(d["data"], str):
            raise TypeError("malformed seed or data")
        return cls(stage=d["stage"], seed=d["seed"], model=model, train=train, vocab=vocab,
                   data=d["data"], torch_stream=bool(d.get("torch_stream", False)))


def is_run_spec(path: str | Path) -> bool:
    """Whether `path` is a run.json that jaxmlp wrote (its format marker, parsable)."""
    try:
        RunSpec.from_json(json.loads(Path(path).read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
            JaxmlpError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the state and everything needed to continue from it."""

    spec: RunSpec
    state: TrainState
    losses: np.ndarray  # (step,) float32: the minibatch loss of every step so far
    data_sha256: str  # of the names file the run trains on ("" if not recorded)
    replaces: str = ""  # "" or the run directory this run replaces when it finishes (--force)
    replaces_fingerprint: str = ""  # that directory's `runs.fingerprint` when it was planned

    @property
    def step(self) -> int:
        return int(self.state.step)


# ---------------------------------------------------------------------------- writing files


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to a temporary name beside `path`, flush it to disk, rename it over `path`.

    Readers see the old file or the new one, never a mix; if anything fails (disk full, a
    kill) the old file is untouched and the temporary one is removed (or, after a kill,
    replaced by the next write). The temporary file is created exclusively and never through
    a symlink: whatever sits at its name (a stale file, a planted link) is unlinked first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with open(os.open(tmp, flags, 0o644), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symlink at `path` itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


# ------------------------------------------------------------------------- (de)serialising


def checkpoint_to_bytes(spec: RunSpec, state: TrainState, losses: np.ndarray,
                        data_sha256: str = "", replaces: str = "",
                        replaces_fingerprint: str = "") -> bytes:
    """The checkpoint file's bytes (see the module docstring)."""
    losses = np.asarray(losses, np.float32)
    if losses.shape != (int(state.step),) and losses.size:
        raise ValueError(f"losses has shape {losses.shape}, state is at step {int(state.step)}")
    payload = serialization.msgpack_serialize({
        "spec": json.dumps(spec.to_json(), sort_keys=True),
        "state": serialization.to_state_dict(
            jax.device_get(state.replace(key=jax.random.key_data(state.key)))),
        "losses": losses,
        "data_sha256": data_sha256,
        "replaces": replaces,
        "replaces_fingerprint": replaces_fingerprint,
    })
    return serialization.msgpack_serialize({
        "format": FORMAT, "version": VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload,
    })


def _state_template(spec: RunSpec) -> TrainState:
    """Shapes and dtypes of the run's TrainState (key as raw key data), computed abstractly;
    opt_state None when the optimizer is a recorded custom one (then it is read as saved)."""
    recorded = isinstance(spec.train.optimizer, optim.RecordedOptimizer)
    train = dataclasses.replace(spec.train, optimizer="sgd") if recorded else spec.train

    def make():
        state = create_train_state(jax.random.key(0), spec.model, train)
        return state.replace(key=jax.random.key_data(state.key))

    template = jax.eval_shape(make)
    return template.replace(opt_state=None) if recorded else template


def checkpoint_from_bytes(blob: bytes, spec: RunSpec, where: str = "checkpoint") -> Checkpoint:
    """Parse and verify a checkpoint written for `spec` (run.json's); RunError if it is not."""
    def corrupted(why: str) -> RunError:
        return RunError(f"{where} is truncated or corrupted ({why}); restore it from a backup "
                        "or train the run again with --force")

    try:
        outer = serialization.msgpack_restore(blob)
    except Exception:  # msgpack raises many types for damaged bytes
        raise corrupted("it does not parse") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise corrupted("not a jaxmlp checkpoint")
    if outer.get("version") != VERSION:
        raise RunError(f"{where} has format version {outer.get('version')!r}, this jaxmlp reads "
                       f"version {VERSION}; use the jaxmlp version that wrote it")
    payload = outer.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get(
            "sha256"):
        raise corrupted("checksum mismatch")
    try:
        inner = serialization.msgpack_restore(payload)
        ck_spec = RunSpec.from_json(json.loads(inner["spec"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, JaxmlpError) as e:
        raise corrupted(f"bad spec: {type(e).__name__}") from None

    differences = _spec_differences(ck_spec.to_json(), spec.to_json())
    if differences:
        raise RunError(f"{where} was written by another run ({differences}); put back this "
                       "run's own checkpoint or train it again with --force")
    if isinstance(ck_spec.train.optimizer, optim.RecordedOptimizer) and not isinstance(
            spec.train.optimizer, optim.RecordedOptimizer):  # given again: read its state too
        ck_spec = dataclasses.replace(ck_spec, train=dataclasses.replace(
            ck_spec.train, optimizer=spec.train.optimizer))

    try:
        template = _state_template(ck_spec)
        raw = serialization.from_state_dict(template, inner["state"])
    except Exception as e:  # whatever a damaged spec or state makes Flax raise
        raise corrupted(f"state does not fit the model: {type(e).__name__}") from None
    want = jax.tree_util.tree_flatten_with_path(template)[0]
    got = jax.tree_util.tree_flatten_with_path(
        raw if template.opt_state is not None else raw.replace(opt_state=None))[0]
    for (path, w), (_, g) in zip(want, got, strict=True):
        g = np.asarray(g)
        if g.shape != w.shape or g.dtype != w.dtype:
            name = jax.tree_util.keystr(path).lstrip(".")
            raise RunError(f"{where} holds {name} of shape {g.shape} {g.dtype}, but the run's "
                           f"model needs {w.shape} {w.dtype}; it is a checkpoint of another "
                           "model: put back this run's own checkpoint or train again with --force")
    state = jax.tree.map(np.asarray, raw)
    state = state.replace(key=jax.random.wrap_key_data(state.key))
    step = int(state.step)
    losses = inner.get("losses")
    if not (0 <= step <= ck_spec.train.steps) or not isinstance(losses, np.ndarray) or (
            losses.size and losses.shape != (step,)):
        raise corrupted("inconsistent step or loss history")
    if not np.isfinite(losses).all():
        raise corrupted("non-finite loss history")
    return Checkpoint(ck_spec, state, losses.astype(np.float32),
                      str(inner.get("data_sha256", "")), str(inner.get("replaces", "")),
                      str(inner.get("replaces_fingerprint", "")))


def _spec_differences(saved: dict, expected: dict, limit: int = 3) -> str:
    """'model.n_hidden 16 (run.json: 32), ...', ignoring the checkpoint interval and data path
    (a resume may change both, and a crash may come between rewriting the two files)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(expected)
    for d in (a, b):  # neither changes a number (the data's content is checked by its hash)
        d.pop("train.chunk", None)
        d.pop("data", None)
    diffs = [f"{k} {a.get(k)!r} (run.json: {b.get(k)!r})" for k in sorted(set(a) | set(b))
             if not _same(a.get(k), b.get(k))]
    return ", ".join(diffs[:limit]) + (", ..." if len(diffs) > limit else "")


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    return x == y


# ---------------------------------------------------------------------------- run directories


def save_checkpoint(run: str | Path, spec: RunSpec, state: TrainState, losses: np.ndarray,
                    data_sha256: str = "", replaces: str = "",
                    replaces_fingerprint: str = "") -> None:
    """Atomically (re)write DIR/checkpoint.msgpack; refuses a non-finite state.

    A failed write raises RunError and leaves the previous checkpoint (if any) as it was.
    """
    run = Path(run)
    kept = ("the previous checkpoint is kept" if (run / CKPT_FILE).is_file()
            else "no checkpoint was written yet")
    if not bool(all_finite((state.params, state.batch_stats, state.opt_state))):
        raise DivergenceError(f"refusing to checkpoint a non-finite state at step "
                              f"{int(state.step)}; {kept} in {str(run)!r}: lower the learning "
                              "rate (--lr)", step=int(state.step))
    blob = checkpoint_to_bytes(spec, state, losses, data_sha256, replaces, replaces_fingerprint)
    try:
        write_atomic(run / CKPT_FILE, blob)
    except OSError as e:
        raise RunError(f"cannot write checkpoint {str(run / CKPT_FILE)!r} "
                       f"({e.strerror or e}); {kept}: free space or fix permissions, then "
                       f"`jaxmlp train --resume {run}`") from None


def save_run(out: str | Path, spec: RunSpec, state: TrainState,
             losses: np.ndarray | None = None, data_sha256: str = "") -> None:
    """Write DIR/run.json and DIR/checkpoint.msgpack (creating DIR).

    `losses` is the (step,) history; without it the checkpoint can be evaluated and sampled
    but not resumed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SPEC_FILE, spec.to_json())
    save_checkpoint(out, spec, state, np.zeros(0, np.float32) if losses is None else losses,
                    data_sha256)


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RunError(f"cannot read {str(path)!r} ({e.strerror}); check its permissions"
                       ) from None


def load_spec(run: str | Path) -> RunSpec:
    """DIR/run.json as a RunSpec; RunError (with the fix) if DIR is not a run directory."""
    run = Path(run)
    shown = str(run)
    try:
        is_dir = run.is_dir()
        exists = is_dir or run.exists()
    except OSError as e:  # e.g. a name too long
        raise RunError(f"cannot use run directory {shown!r} ({e.strerror}); pass the DIR of a "
                       "`jaxmlp train` run") from None
    if not exists:
        raise RunError(f"run directory {shown!r} does not exist; pass the DIR of a "
                       "`jaxmlp train` run (default runs/<stage>-s<seed>)")
    if not is_dir:
        raise RunError(f"run directory {shown!r} is a file, not a directory; pass the DIR "
                       "of a `jaxmlp train` run")
    if not (run / SPEC_FILE).is_file():
        raise RunError(f"{shown!r} is not a jaxmlp run directory (it has no {SPEC_FILE}); "
                       "pass the DIR of a `jaxmlp train` run")
    try:
        d = json.loads(read_file(run / SPEC_FILE))
    except (ValueError, RecursionError):
        d = None  # damaged: reported as corrupted below
    if isinstance(d, dict) and d.get("format") != RUN_FORMAT:
        raise RunError(f"{shown!r} is not a jaxmlp run directory (its {SPEC_FILE} has no "
                       f"{RUN_FORMAT!r} format marker: another program wrote it); pass the DIR "
                       "of a `jaxmlp train` run")
    try:
        return RunSpec.from_json(d)
    except RunError:  # the model's class cannot be imported: said as it is
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, JaxmlpError) as e:
        raise RunError(f"{str(run / SPEC_FILE)!r} is corrupted ({type(e).__name__}); restore it "
                       "or train the run again with --force") from None


def load_checkpoint(run: str | Path, optimizer=None) -> Checkpoint:
    """Read and verify a run directory's checkpoint; RunError naming the problem and the fix.

    optimizer: a run's custom optimizer, given again (`optim.with_optimizer`); without it such a
    run's opt_state is the saved state dict, as read (enough to evaluate and sample).
    """
    run = Path(run)
    spec = load_spec(run)
    if optimizer is not None:
        spec = optim.with_optimizer(spec, optimizer, run)
    path = run / CKPT_FILE
    if not path.is_file():
        raise RunError(f"{str(path)!r} is missing (the run stopped before its first checkpoint "
                       f"or the file was moved); put it back, or start the run again with "
                       f"`jaxmlp train --resume {run}`")
    return checkpoint_from_bytes(read_file(path), spec, where=f"checkpoint {str(path)!r}")


def load_run(run: str | Path, optimizer=None) -> tuple[RunSpec, TrainState]:
    """(spec, state) of a run directory written by `jaxmlp train`; raises RunError with the fix.
    optimizer: as `load_checkpoint`'s."""
    ck = load_checkpoint(run, optimizer)
    return ck.spec, ck.state


def is_finished(run: str | Path) -> bool:
    """A run is finished once its metrics.json exists (written after everything else)."""
    return (Path(run) / METRICS_FILE).is_file()
