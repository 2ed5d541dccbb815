"""Compiled programs kept on disk: read back by the next process, keyed on everything a
program depends on, never kept for the user's own code, and a damaged file only recompiles."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxmlp import program_cache
from jaxmlp.program_cache import Compiled, program_key
from jaxmlp.stages import make_model
from jaxmlp.train import TrainConfig


@pytest.fixture
def cache_dir(tmp_path):
    program_cache.set_dir(tmp_path)
    yield tmp_path
    program_cache.set_dir(None)


def test_keys_are_plain_data_and_say_everything(cache_dir):
    model = make_model("batchnorm", 27, block_size=3)
    x = jnp.zeros((4, 3), jnp.int32)
    d = program_cache.digest(program_key(model, TrainConfig(), arrays=x), "cpu", {})
    assert d == program_cache.digest(program_key(model, TrainConfig(), arrays=x), "cpu", {})
    others = [program_key(model, TrainConfig(batch_size=64), arrays=x),
              program_key(model.copy(n_hidden=100), TrainConfig(), arrays=x),
              program_key(model, TrainConfig(), arrays=jnp.zeros((5, 3), jnp.int32))]
    assert d not in {program_cache.digest(k, "cpu", {}) for k in others}
    assert d != program_cache.digest(program_key(model, TrainConfig(), arrays=x), "cpu",
                                     {"xla_cpu_prefer_vector_width": 512})
    # The user's own optimizer is code: its programs are traced every time.
    custom = TrainConfig(optimizer=optax.adamw(1e-3))
    assert program_cache.digest(program_key(model, custom, arrays=x), "cpu", {}) is None
    program_cache.set_dir(None)
    assert program_cache.digest(program_key(model, TrainConfig(), arrays=x), "cpu", {}) is None


def test_a_damaged_file_is_compiled_again(cache_dir):
    x = jnp.arange(4.0)
    key = program_key("double", arrays=x)
    first = Compiled()(key, lambda: jax.jit(lambda v: 2 * v).lower(x))
    (kept,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert list(first(x)) == [0.0, 2.0, 4.0, 6.0]
    read_back = Compiled()(key, lambda: pytest.fail("traced although kept on disk"))
    assert list(read_back(x)) == [0.0, 2.0, 4.0, 6.0]
    kept.write_bytes(b"not a program")
    again = Compiled()(key, lambda: jax.jit(lambda v: 2 * v).lower(x))
    assert list(again(x)) == [0.0, 2.0, 4.0, 6.0]
    assert not kept.exists() or kept.read_bytes() != b"not a program"  # removed or rewritten


def test_a_warm_command_trains_exactly_what_a_cold_one_does(tmp_path, cli_env):
    env = {k: v for k, v in cli_env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXMLP_CACHE_DIR"] = str(tmp_path / "cache")
    runs = []
    for name in ("cold", "warm"):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "jaxmlp", "train", "--steps", "300", "--n-hidden",
                        "16", "--checkpoint-every", "100", "--out", str(out), "--quiet"],
                       env=env, check=True, capture_output=True, timeout=300)
        runs.append((out / "checkpoint.msgpack").read_bytes())
    assert runs[0] == runs[1]
    assert len(os.listdir(tmp_path / "cache" / "jaxmlp-programs")) >= 3  # init, chunk, eval


SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmlp import program_cache
from jaxmlp.program_cache import Compiled, program_key
program_cache.set_dir(sys.argv[1])
assert jax.device_count() == 2
one = jnp.arange(4.0)  # on device 0 only
both = jax.device_put(jnp.arange(4.0), NamedSharding(Mesh(np.array(jax.devices()), ("r",)), P("r")))
for x in (one, both, one):
    program = Compiled()(program_key("double", arrays=x), lambda: jax.jit(lambda v: 2 * v).lower(x))
    assert list(program(x)) == [0.0, 2.0, 4.0, 6.0]
print("ok")
"""


def test_programs_come_back_on_the_devices_they_were_compiled_for(tmp_path, cli_env):
    """One program on one of two devices, another split over both: each, read back in a new
    process, runs where it was compiled to run."""
    env = {**cli_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for _ in range(2):  # compiled and kept, then read back
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "ok", r.stderr[-2000:]
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


HIT_SCRIPT = """
import sys, jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from jaxmlp import program_cache
from jaxmlp.program_cache import Compiled, program_key
if sys.argv[2] != "-":
    program_cache.set_dir(sys.argv[2])
tree = {"a": jnp.ones((3, 4)), "b": jnp.zeros(5)}
f = jax.jit(lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)])))
print(bool(Compiled()(program_key("finite", arrays=tree), lambda: f.lower(tree))(tree)))
"""


def test_an_executable_read_from_jaxs_own_cache_is_not_kept(tmp_path, cli_env):
    """JAX's persistent cache hands back executables that serialise without their code: one
    kept would fail when it runs ("Function ... not found"). Only what XLA compiled is kept."""
    jax_dir, ours = tmp_path / "jax", tmp_path / "ours"

    def run(kept):
        r = subprocess.run([sys.executable, "-c", HIT_SCRIPT, str(jax_dir), kept], env=cli_env,
                           capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "True", r.stderr[-2000:]

    run("-")  # compiled; only JAX's cache keeps it
    run(str(ours))  # read from JAX's cache: not kept by ours
    assert not ours.exists() or not [p for p in ours.iterdir() if not p.name.startswith(".")]
    run(str(ours))  # and the program still runs


READ_BACK = """
import sys, jax, jax.numpy as jnp
from jaxmlp import program_cache
program_cache.enable_compilation_cache()
f = jax.jit(lambda v: jnp.isfinite(v).all() & (v.sum() > 1))
x = jnp.arange(4.0)
if sys.argv[1] == "jit-first":
    assert bool(f(x))  # plain jit: JAX compiles, or reads its own persistent cache
program = program_cache.Compiled()(program_cache.program_key("read-back", arrays=x),
                                   lambda: f.lower(x))
assert bool(program(x))
"""


def test_a_program_jax_read_from_its_own_cache_is_never_kept(tmp_path, cli_env):
    """JAX hands a second compile of a program the executable it already holds. Where that one
    came from JAX's persistent cache it has no code to serialise: kept, it would fail in the
    next process ("Function ... not found"), as it once did after a jaxmlp update."""
    env = dict(cli_env, JAXMLP_CACHE_DIR=str(tmp_path))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    programs = tmp_path / "jaxmlp-programs"

    def run(mode):
        r = subprocess.run([sys.executable, "-c", READ_BACK, mode], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    run("jit-first")  # JAX compiles f and writes its cache
    for p in programs.glob("*"):  # jaxmlp's own programs gone (as after an update): JAX's stay
        p.unlink()
    run("jit-first")  # f read from JAX's cache, then compiled again through `Compiled`
    run("compiled-only")  # whatever was kept must run
    run("compiled-only")
