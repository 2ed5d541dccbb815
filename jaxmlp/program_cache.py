"""Compiled programs: kept per process (`Compiled`), and on disk, so that a repeated command
neither traces nor compiles.

JAX's persistent compilation cache skips XLA's compilation, but a command still traces and
lowers every program to find its cache key: for the lecture's models that is most of the
fixed cost of a short run. This cache is keyed before tracing, on what jaxmlp knows determines
a program: the `program_key` (static arguments, argument types, tree structure), the platform
and devices, the JAX version and flags, and the source of the jaxmlp package itself.

It only keeps programs whose static arguments are plain data that jaxmlp defines (its own
models and configs, numbers and strings): a module or optimizer of the user's own is code this
key cannot see change, so its programs are always traced. Off until `set_dir` (the `jaxmlp`
commands turn it on beside JAX's cache: `enable_compilation_cache`). Only what XLA compiled is
kept (not what JAX read from its own cache), and a file that cannot be read back is removed and
the program compiled again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

_DIR: Path | None = None


def set_dir(path: str | Path | None) -> None:
    """Keep compiled programs in `path` (None: keep none)."""
    global _DIR
    _DIR = None if path is None else Path(path)


@contextlib.contextmanager
def off():
    """Within: no program kept or read back (a benchmark times compilation, not a read)."""
    global _DIR
    previous, _DIR = _DIR, None
    try:
        yield
    finally:
        _DIR = previous


class NotPlain(Exception):
    """A static argument this cache cannot key on (the user's own code)."""


def _plain(x) -> str:
    """A canonical text for plain data; NotPlain for anything whose behaviour is code."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return repr(x)
    if isinstance(x, (tuple, list)):
        return "(" + ",".join(map(_plain, x)) + ")"
    if isinstance(x, dict):
        return "{" + ",".join(sorted(f"{_plain(k)}:{_plain(v)}" for k, v in x.items())) + "}"
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
    except FileNotFoundError:
        return None
    except Exception:  # truncated, or not a program: removed, compiled again
        with contextlib.suppress(OSError):
            (_DIR / name).unlink()
        return None


# Executables JAX read back from its own persistent cache serialise without their code (loading
# such a file fails when it runs: "Function ... not found"): only what XLA compiled is kept. JAX
# says when it consults its cache and when that is a hit; a compile that consults nothing was
# served from JAX's memory, and is as fresh as the executable was the first time it was seen.
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_events = threading.local()  # per thread: JAX reports an event in the thread that compiles
_seen: dict[int, tuple[Any, bool]] = {}  # id -> (executable, whether XLA compiled it)
_SEEN_CAPACITY = 256


def _count_cache_events(event: str, **_) -> None:
    if event in (_REQUEST, _HIT):
        setattr(_events, event, getattr(_events, event, 0) + 1)


jax.monitoring.register_event_listener(_count_cache_events)


def compile_fresh(lower: Callable[[], Any], options: dict):
    """(lower().compile(...), whether XLA compiled it in this process rather than JAX reading
    it from its persistent cache; unknown counts as read)."""
    def counts():
        return getattr(_events, _REQUEST, 0), getattr(_events, _HIT, 0)

    requests, hits = counts()
    program = lower().compile(compiler_options=options or None)
    executable = program.runtime_executable()
    requests_now, hits_now = counts()
    if requests_now > requests:  # a compile that consulted JAX's cache
        fresh = hits_now == hits
    elif id(executable) in _seen:  # from JAX's memory, compiled or read when first seen here
        fresh = _seen[id(executable)][1]
    else:  # from JAX's memory, of unknown origin unless there is no cache to read it from
        fresh = not (jax.config.jax_enable_compilation_cache
                     and jax.config.jax_compilation_cache_dir)
    if executable is not None:
        _seen.pop(id(executable), None)
        while len(_seen) >= _SEEN_CAPACITY:  # forgotten means unknown: not kept, never wrong
            del _seen[next(iter(_seen))]
        _seen[id(executable)] = (executable, fresh)
    return program, fresh


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


# XLA options for the training programs on a CPU (docs/speed.md), each a few percent of a step
# and none changing a number: prefer LLVM's 512-bit vectors where the CPU has them (AVX-512),
# and let copy insertion see through the loop's regions, which spares the copies of the
# parameters a step would otherwise make before updating them. Other backends get no options.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512,
                        "xla_cpu_copy_insertion_use_region_analysis": True}


def compiler_options(platform: str) -> dict:
    """The options to compile the training loop with on `platform` ("cpu", "gpu", "tpu")."""
    return _supported_cpu_options() if platform == "cpu" else {}


@functools.cache
def _supported_cpu_options() -> dict:
    """The CPU options this XLA accepts (one it no longer knows refuses to compile)."""
    try:
        x = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices(backend="cpu")[0]))
        lowered = jax.jit(lambda x: x + 1).lower(x)
    except Exception:  # no CPU backend to ask
        return {}
    supported = {}
    for name, value in CPU_COMPILER_OPTIONS.items():
        try:
            lowered.compile(compiler_options={name: value})
        except Exception:  # any refusal means "not supported here"
            continue
        supported[name] = value
    return supported


class Compiled:
    """Programs compiled ahead of time, once per key (the `capacity` most recently used kept),
    with the seconds spent compiling.

    Ahead of time (not on first call, as `jax.jit` would) so that a run can report its
    compile time apart from its run time; the key must say everything the program depends on
    (`program_key`). Where the disk cache is on (`program_cache`), a program compiled by an
    earlier process is read back instead of traced and compiled again.
    """

    def __init__(self, capacity: int = 32):
        self.seconds = 0.0
        self.capacity = capacity  # a notebook trying many shapes must not grow without bound
        self._programs: dict[Any, Any] = {}

    def __call__(self, key, lower: Callable[[], Any], platform: str | None = None):
        if key in self._programs:
            self._programs[key] = self._programs.pop(key)  # most recently used last
        else:
            t0 = time.perf_counter()
            options = compiler_options(platform) if platform else {}
            kept = digest(key, platform, options)
            program = load(kept)
            if program is None:
                program, compiled = compile_fresh(lower, options)
                if compiled:
                    save(kept, program)
            self.seconds += time.perf_counter() - t0
            while len(self._programs) >= self.capacity:
                del self._programs[next(iter(self._programs))]
            self._programs[key] = program
        return self._programs[key]

    def clear(self) -> None:
        """Forget every program (a benchmark's compile time must not be a cache hit)."""
        self._programs.clear()


def program_key(*static, arrays=()) -> tuple:
    """A `Compiled` key: the static arguments, and the type (shape, dtype) and placement
    (sharding) of every array of `arrays` with their tree structure."""
    return (*static, *((jax.typeof(x), getattr(x, "sharding", None))
                       for x in jax.tree.leaves(arrays)), jax.tree.structure(arrays))


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for the jaxmlp commands, so that a repeated command
    compiles nothing it compiled before. It lives in $XDG_CACHE_HOME/jaxmlp/jax (default
    ~/.cache/jaxmlp/jax); JAXMLP_CACHE_DIR moves it, JAXMLP_CACHE_DIR=off turns it off, and
    JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins. Its jaxmlp-programs/ folder keeps whole
    compiled programs (this module: no tracing either). Returns the directory used."""
    where = os.environ.get("JAXMLP_CACHE_DIR")
    if (where or "").lower() in ("off", "0"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX's own setting: jaxmlp's beside it
        where = os.environ["JAX_COMPILATION_CACHE_DIR"]
        set_dir(os.path.join(where, "jaxmlp-programs"))
        return where
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "jaxmlp", "jax")
    jax.config.update("jax_compilation_cache_dir", where)
    set_dir(os.path.join(where, "jaxmlp-programs"))
    # Every program, however small or quick to compile: a command compiles dozens of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where
