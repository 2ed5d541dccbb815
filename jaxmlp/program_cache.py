"""Compiled programs kept on disk, so that a repeated command neither traces nor compiles.

JAX's persistent compilation cache skips XLA's compilation, but a command still traces and
lowers every program to find its cache key: for the lecture's models that is most of the
fixed cost of a short run. This cache is keyed before tracing, on what jaxmlp knows determines
a program: the `program_key` (static arguments, argument types, tree structure), the platform
and devices, the JAX version and flags, and the source of the jaxmlp package itself.

It only keeps programs whose static arguments are plain data that jaxmlp defines (its own
models and configs, numbers and strings): a module or optimizer of the user's own is code this
key cannot see change, so its programs are always traced. Off until `set_dir` (the `jaxmlp`
commands turn it on beside JAX's cache: `cli.enable_compilation_cache`). A file that cannot be
read back is ignored and written again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
from pathlib import Path

import jax

_DIR: Path | None = None


def set_dir(path: str | Path | None) -> None:
    """Keep compiled programs in `path` (None: keep none)."""
    global _DIR
    _DIR = None if path is None else Path(path)


class NotPlain(Exception):
    """A static argument this cache cannot key on (the user's own code)."""


def _plain(x) -> str:
    """A canonical text for plain data; NotPlain for anything whose behaviour is code."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return repr(x)
    if isinstance(x, (tuple, list)):
        return "(" + ",".join(map(_plain, x)) + ")"
    if isinstance(x, dict):
        return "{" + ",".join(f"{_plain(k)}:{_plain(v)}" for k, v in sorted(x.items())) + "}"
    if isinstance(x, jax.sharding.Mesh):
        return f"Mesh({x.axis_names},{[d.id for d in x.devices.flat]})"
    if isinstance(x, jax.tree_util.PyTreeDef) or type(x).__module__.split(".")[0] in (
            "jax", "jaxlib"):
        return str(x)  # avals, tree structures
    cls = type(x)
    if dataclasses.is_dataclass(x) and cls.__module__.startswith("jaxmlp."):
        fields = [f.name for f in dataclasses.fields(x) if f.name not in ("parent", "name")]
        return f"{cls.__module__}.{cls.__qualname__}(" + ",".join(
            f"{f}={_plain(getattr(x, f))}" for f in fields) + ")"
    raise NotPlain(cls.__qualname__)


@functools.cache
def _source_digest() -> str:
    """The jaxmlp package's own code: a changed line means other programs."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _environment(platform: str | None, options: dict) -> str:
    import jaxlib

    devices = [(d.id, d.platform, d.device_kind) for d in jax.devices()]
    flags = {k: str(getattr(jax.config, k, None)) for k in (
        "jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
        "jax_default_prng_impl", "jax_threefry_partitionable")}
    return repr((jax.__version__, jaxlib.__version__, platform, devices, jax.process_index(),
                 sorted(options.items()), os.environ.get("XLA_FLAGS", ""), sorted(flags.items()),
                 _source_digest()))


def digest(key: tuple, platform: str | None, options: dict) -> str | None:
    """The file name of `key`'s program, or None when it must not be kept (cache off, or a
    static argument that is code)."""
    if _DIR is None:
        return None
    try:
        text = _plain(key)
    except NotPlain:
        return None
    return hashlib.sha256((text + _environment(platform, options)).encode()).hexdigest()


def load(name: str | None):
    """The compiled program kept under `name`, or None."""
    if name is None:
        return None
    try:
        from jax.experimental import serialize_executable

        with open(_DIR / name, "rb") as f:
            serialized, in_tree, out_tree, device_ids = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}
        return serialize_executable.deserialize_and_load(  # on the devices it was compiled for
            serialized, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception:  # absent, truncated, from another build: compile it again
        return None


def save(name: str | None, program) -> None:
    """Keep `program` under `name` (atomically; a failure to write only costs the saving)."""
    if name is None:
        return
    tmp = None
    try:
        from jax.experimental import serialize_executable

        device_ids = [d.id for d in program._executable.xla_executable.local_devices()]
        blob = pickle.dumps((*serialize_executable.serialize(program), device_ids))
        _DIR.mkdir(parents=True, exist_ok=True)
        tmp = _DIR / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, _DIR / name)
    except Exception:  # a full disk or a program that cannot be serialised: not kept
        if tmp is not None:
            tmp.unlink(missing_ok=True)
