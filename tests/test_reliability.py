"""Checkpoints, kill-and-resume, failed writes, divergence and determinism."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmlp import checkpoint as ckpt
from jaxmlp import rundir
from jaxmlp.cli import main
from jaxmlp.errors import DivergenceError, RunError
from jaxmlp.evaluate import sample_names
from jaxmlp.stages import Schedule, make_model
from jaxmlp.train import TrainConfig, create_train_state, fit

TIMINGS = {"seconds", "compile_seconds", "us_per_step", "resumed_from_step", "date"}

# Runs `jaxmlp train` with checkpoint writes patched to die: when writing the N-th checkpoint
# (argv[2]) it writes half of the file under the temporary name, tells the test (argv[1]) and
# waits to be SIGKILLed.
KILLED_MID_WRITE = """
import os, sys, time
from pathlib import Path
import jaxmlp.checkpoint as ck
from jaxmlp.cli import main

marker, die_at, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
real_write, writes = ck.write_atomic, []

def write_atomic(path, data):
    path = Path(path)
    if path.name == ck.CKPT_FILE:
        writes.append(path)
        if len(writes) == die_at:
            with open(path.with_name(f".{path.name}.tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            marker.write_text("half written")
            time.sleep(600)
    real_write(path, data)

ck.write_atomic = write_atomic
sys.exit(main(argv))
"""


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def assert_same_results(a: Path, b: Path, capsys):
    """Everything but timings: metrics, every step's loss, the final state, sampled names."""
    ma, mb = (json.loads((d / ckpt.METRICS_FILE).read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k not in TIMINGS} == \
        {k: v for k, v in mb.items() if k not in TIMINGS}
    np.testing.assert_array_equal(np.load(a / ckpt.LOSSES_FILE), np.load(b / ckpt.LOSSES_FILE))
    ca, cb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert ca.step == cb.step == 3000
    np.testing.assert_array_equal(ca.losses, cb.losses)
    for x, y in zip(jax.tree.leaves(ca.state.replace(key=jax.random.key_data(ca.state.key))),
                    jax.tree.leaves(cb.state.replace(key=jax.random.key_data(cb.state.key))),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    samples = []
    for d in (a, b):
        assert main(["sample", "--run", str(d), "-n", "30", "--seed", "7"]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] and len(samples[0].split()) > 10


def test_sigkill_mid_write_then_resume_equals_uninterrupted(tiny_run, tiny_run_args, cli_env,
                                                             tmp_path, capsys, sigkill_at_marker):
    out, marker = tmp_path / "run", tmp_path / "marker"
    # Checkpoint writes: step 0, 1000, then die halfway through writing step 2000's.
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE, str(marker), "3", "train", *tiny_run_args,
         "--out", str(out)], env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sigkill_at_marker(child, marker, "the training subprocess never got to step 2000")
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()

    # What the kill left: the step-1000 checkpoint whole, half a temporary file, no results.
    assert (out / f".{ckpt.CKPT_FILE}.tmp").is_file()
    assert not (out / ckpt.METRICS_FILE).exists()
    ck = ckpt.load_checkpoint(out)
    assert ck.step == 1000 and ck.losses.shape == (1000,)

    resumed = subprocess.run([sys.executable, "-m", "jaxmlp", "train", "--resume", str(out),
                              "--quiet"], env=cli_env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "step 1,000" in resumed.stdout
    assert not (out / f".{ckpt.CKPT_FILE}.tmp").exists()
    assert json.loads((out / ckpt.METRICS_FILE).read_text())["resumed_from_step"] == 1000
    assert_same_results(tiny_run, out, capsys)


def test_resume_of_a_finished_run_is_refused(tiny_run, capsys):
    before = tree_bytes(tiny_run)
    assert main(["train", "--resume", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert "already finished" in err and "jaxmlp eval" in err
    assert tree_bytes(tiny_run) == before


# --------------------------------------------------------------------- in-process, the API


@pytest.fixture(scope="module")
def small(names_data):
    """A small model and the pieces to checkpoint it (no batch norm: cheap to initialise)."""
    model = make_model("kaiming", vocab_size=names_data.vocab.size, n_hidden=32)
    config = TrainConfig(steps=400, chunk=100, schedule=Schedule((0.1,), ()))
    spec = ckpt.RunSpec("kaiming", 0, model, config, names_data.vocab, "data/names.txt")
    return model, config, spec


@pytest.fixture(scope="module")
def whole(small, names_data, tmp_path_factory):
    """An uninterrupted 400-step run that checkpoints every 100 steps, as `jaxmlp train` does;
    returns (FitResult, {step: checkpoint file bytes})."""
    _, _, spec = small
    run, saved = tmp_path_factory.mktemp("whole"), {}

    def on_chunk(state, losses):
        ckpt.save_checkpoint(run, spec, state, losses)
        saved[int(state.step)] = (run / ckpt.CKPT_FILE).read_bytes()

    state = create_train_state(jax.random.key(spec.seed), spec.model, spec.train)
    ckpt.save_run(run, spec, state, np.zeros(0, np.float32))
    result = fit(state, *names_data.train, spec.model, spec.train, log=None, progress=False,
                 on_chunk=on_chunk)
    return result, saved


def test_resume_continues_bit_for_bit_on_the_interval_grid(small, whole, names_data, tmp_path):
    """Continue from the step-200 checkpoint (what a crash at step 2xx leaves) with another
    checkpoint interval: checkpoints fall on its multiples, every number is the same."""
    model, config, spec = small
    result, saved = whole
    (tmp_path / ckpt.SPEC_FILE).write_text(json.dumps(spec.to_json()))
    (tmp_path / ckpt.CKPT_FILE).write_bytes(saved[200])
    ck = ckpt.load_checkpoint(tmp_path)
    assert ck.step == 200 and ck.spec == spec
    np.testing.assert_array_equal(ck.losses, result.losses[:200])
    seen = []
    rest = fit(ck.state, *names_data.train, model, TrainConfig(400, chunk=150,
                                                               schedule=config.schedule),
               log=None, progress=False,
               on_chunk=lambda s, losses: seen.append((int(s.step), len(losses))))
    assert seen == [(300, 100), (400, 200)]
    np.testing.assert_array_equal(np.concatenate([ck.losses, rest.losses]), result.losses)
    for x, y in zip(jax.tree.leaves(rest.state.params), jax.tree.leaves(result.state.params),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_same_seed_same_losses_and_samples(small, whole, names_data):
    model, config, _ = small
    result, _ = whole
    again, other = (fit(create_train_state(jax.random.key(seed), model, config),
                        *names_data.train, model, config, log=None, progress=False)
                    for seed in (0, 4))
    np.testing.assert_array_equal(again.losses, result.losses)
    assert not np.array_equal(other.losses, result.losses)
    names = [sample_names(model, {"params": r.state.params}, names_data.vocab,
                          jax.random.key(11), num=20) for r in (result, again)]
    assert names[0] == names[1]


def test_failed_write_keeps_the_last_good_checkpoint(small, whole, tmp_path, monkeypatch):
    _, _, spec = small
    result, saved = whole
    real_open = open

    class DiskFull:
        """A file that takes half of what is written, then fails like a full disk."""

        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    (tmp_path / ckpt.SPEC_FILE).write_text(json.dumps(spec.to_json()))
    (tmp_path / ckpt.CKPT_FILE).write_bytes(saved[300])
    monkeypatch.setattr(ckpt, "open", DiskFull, raising=False)
    with pytest.raises(RunError, match="previous checkpoint is kept") as exc:
        ckpt.save_checkpoint(tmp_path, spec, result.state, result.losses)
    assert "\n" not in str(exc.value) and "No space left" in str(exc.value)
    assert (tmp_path / ckpt.CKPT_FILE).read_bytes() == saved[300]
    assert not (tmp_path / f".{ckpt.CKPT_FILE}.tmp").exists()
    assert ckpt.load_checkpoint(tmp_path).step == 300


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(small, names_data,
                                                                      tmp_path):
    _, _, spec = small
    boom = TrainConfig(steps=400, chunk=100, schedule=Schedule((0.1, 1e38), (250,)))
    spec = ckpt.RunSpec("kaiming", 0, spec.model, boom, spec.vocab, spec.data)
    state = create_train_state(jax.random.key(0), spec.model, boom)
    ckpt.save_run(tmp_path, spec, state, np.zeros(0, np.float32))
    with pytest.raises(DivergenceError, match=r"at step 2[5-9]\d; lower the learning rate "
                                              r"\(e\.g\. --lr 0\.01,1e\+37\)") as exc:
        fit(state, *names_data.train, spec.model, boom, log=None, progress=False,
            on_chunk=lambda s, losses: ckpt.save_checkpoint(tmp_path, spec, s, losses))
    assert 250 <= exc.value.step < 300
    ck = ckpt.load_checkpoint(tmp_path)  # steps 200..299 diverged inside one chunk: 200 is kept
    assert ck.step == 200 and np.isfinite(ck.losses).all()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ck.state.params))


def test_a_non_finite_state_is_never_saved(small, tmp_path):
    _, _, spec = small
    run = tmp_path / "run"
    good = create_train_state(jax.random.key(0), spec.model, spec.train)
    ckpt.save_run(run, spec, good, np.zeros(0, np.float32))
    before = (run / ckpt.CKPT_FILE).read_bytes()
    bad = good.replace(params=jax.tree.map(lambda x: x * np.nan, good.params))
    with pytest.raises(DivergenceError, match="refusing to checkpoint a non-finite state"):
        ckpt.save_checkpoint(run, spec, bad, np.zeros(0, np.float32))
    assert (run / ckpt.CKPT_FILE).read_bytes() == before


def test_other_model_checkpoint_is_refused(small, tmp_path):
    _, _, spec = small
    a, b = tmp_path / "a", tmp_path / "b"
    ckpt.save_run(a, spec, create_train_state(jax.random.key(0), spec.model, spec.train))
    wide = spec.model.copy(n_hidden=64)
    spec_b = ckpt.RunSpec("kaiming", 0, wide, spec.train, spec.vocab, spec.data)
    ckpt.save_run(b, spec_b, create_train_state(jax.random.key(0), wide, spec.train))
    shutil.copy(a / ckpt.CKPT_FILE, b / ckpt.CKPT_FILE)
    before = (b / ckpt.CKPT_FILE).read_bytes()
    with pytest.raises(RunError, match=r"written by another run \(model.n_hidden 32 \(run.json: "
                                       r"64\)\)"):
        ckpt.load_run(b)
    assert (b / ckpt.CKPT_FILE).read_bytes() == before

    # A well-formed file whose arrays do not fit the spec it claims (made by hand).
    forged = ckpt.checkpoint_to_bytes(spec_b, create_train_state(jax.random.key(0), spec.model,
                                                                  spec.train), [])
    (b / ckpt.CKPT_FILE).write_bytes(forged)
    with pytest.raises(RunError, match=r"holds params\['hidden'\]\['bias'\] of shape "
                                       r"\(32,\) float32, but the run's model needs \(64,\)"):
        ckpt.load_checkpoint(b)


def test_run_lock_refuses_a_second_writer(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / ckpt.METRICS_FILE).unlink()  # unfinished: resumable
    before = tree_bytes(run)
    with rundir.run_lock(run):
        assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "in use by another jaxmlp process" in err and len(err.splitlines()) == 1
    assert tree_bytes(run) == before


def test_ctrl_c_leaves_a_resumable_run_and_says_how(tmp_path, capsys, monkeypatch):
    import jaxmlp.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxmlp.train, "fit", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--stage", "kaiming", "--n-hidden", "32",
                 "--steps", "400", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"interrupted; the last checkpoint (step 0) is in {run}" in err
    assert f"jaxmlp train --resume {run}" in err
    ck = ckpt.load_checkpoint(run)
    assert ck.step == 0 and ck.losses.shape == (0,) and ck.spec.train.steps == 400
