import atexit
import os
import shutil
import tempfile

import pytest

# The jaxmlp commands keep a persistent compilation cache (~/.cache/jaxmlp): the tests keep
# theirs apart, one per session, shared by this process, the test workers (set before they
# start, they inherit it) and every `jaxmlp` subprocess: a program compiled once in the
# session is read back everywhere else.
if "JAXMLP_CACHE_DIR" not in os.environ:  # the first process of the session: it cleans up
    os.environ["JAXMLP_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmlp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXMLP_CACHE_DIR"], ignore_errors=True)
# The tests run a few steps of many small programs: compiling them is most of the suite's time,
# and LLVM's optimisation passes most of compiling. Without them numbers move in the last bits
# only; every comparison in the suite is between runs under the same flags, or to a tolerance.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0") if f)
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

from jaxmlp.program_cache import enable_compilation_cache

enable_compilation_cache()

from jaxmlp.data import load_dataset  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _forget_programs_between_modules():
    """One process runs every test: drop the compiled programs each module leaves behind, so
    the suite's memory stays that of one module, not the sum of all (CI machines have less)."""
    yield
    import gc

    import jax

    from jaxmlp import sweep, train

    train._PROGRAMS.clear()
    sweep._PROGRAMS.clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def names_data():
    """The bundled names file, block_size 3 (loaded once per session)."""
    return load_dataset()


# Shared by tests/test_reliability.py and tests/test_cli_errors.py.
TINY_RUN_ARGS = ["--steps", "3000", "--checkpoint-every", "1000", "--n-hidden", "16", "--quiet"]


@pytest.fixture(scope="session")
def tiny_run_args():
    return list(TINY_RUN_ARGS)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """Environment for `python -m jaxmlp` subprocesses: this checkout's package, and the
    session's compilation cache (JAXMLP_CACHE_DIR, above)."""
    import os
    from pathlib import Path

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    return env


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cli_env):
    """A finished, uninterrupted `jaxmlp train` run (3,000 steps, checkpoints every 1,000),
    trained in its own process. Copy it before changing anything in it."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny") / "run"
    subprocess.run([sys.executable, "-m", "jaxmlp", "train", *TINY_RUN_ARGS, "--out", str(out)],
                   env=cli_env, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def sigkill_at_marker():
    """`kill(child, marker)`: wait until the subprocess `child` creates `marker` (it fails
    the test if the child dies first or takes over 5 minutes), then SIGKILL it."""
    import signal
    import time

    def kill(child, marker, never: str = "the training subprocess never got there"):
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, never
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL

    return kill
