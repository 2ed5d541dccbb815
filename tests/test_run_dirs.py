"""A user's files are never lost: what counts as a run, what --force removes, races, inputs read
once, temporary files, paths, pipes and encodings, and advice that is true."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jaxmlp import checkpoint as ckpt
from jaxmlp import rundir, runs
from jaxmlp.cli import main
from jaxmlp.data import DEFAULT_DATA

SMALL = ["--steps", "200", "--checkpoint-every", "100", "--n-hidden", "16", "--quiet"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root (a symlink as its target's name), with each file's bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = (f"-> {os.readlink(p)}".encode() if p.is_symlink()
                    else p.read_bytes() if p.is_file() else None)
    return out


def run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return rc, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small finished run, trained once for the module (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------- 1. what a run is


def test_a_folder_with_someone_elses_run_json_is_not_a_run(tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "run.json").write_text('{"name": "my project", "model": {"class": "MLP"}}')
    (proj / "data.csv").write_text("a,b\n1,2\n")
    before = tree(tmp_path)
    for extra in ([], ["--force"]):
        rc, err = run(["train", *SMALL, "--out", str(proj), *extra], capsys)
        assert rc == 2 and "holds no jaxmlp run" in err and "unfinished" not in err
    rc, err = run(["train", "--resume", str(proj)], capsys)
    assert rc == 2 and "not a jaxmlp run directory" in err
    assert tree(tmp_path) == before


def test_force_removes_only_jaxmlps_own_files(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.md").write_text("my notes")
    (out / "figs").mkdir()
    (out / "figs" / "a.png").write_bytes(b"png")
    before = tree(tmp_path)
    rc, err = run(["train", *SMALL, "--out", str(out), "--force", "--seed", "1"], capsys)
    assert rc == 2 and "'figs', 'notes.md'" in err and "move them out" in err
    assert tree(tmp_path) == before
    # Without them, --force replaces the run: exactly the five files, the new ones.
    shutil.rmtree(out / "figs")
    (out / "notes.md").unlink()
    rc, _ = run(["train", *SMALL, "--out", str(out), "--force", "--seed", "1"], capsys)
    assert rc == 0 and sorted(os.listdir(out)) == sorted(ckpt.RUN_FILES)
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ------------------------------------------------- 2. resuming an interrupted --force run


def interrupted_force_run(finished, tmp_path) -> Path:
    """OUT (a finished run) and OUT.partial: a --force run stopped at its first checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    plan = runs.plan_new_run("batchnorm", seed=2, out=out, force=True, n_hidden=16,
                             config=runs.TrainConfig(steps=200, chunk=100))
    with runs._claimed(plan) as workdir:  # what a kill right after the first checkpoint leaves
        ckpt.write_json(workdir / ckpt.SPEC_FILE, plan.spec.to_json())
        ckpt.save_checkpoint(workdir, plan.spec, plan.state, plan.losses, plan.data.sha256,
                             plan.replaces, plan.replaces_fingerprint)
    return out


def test_resume_of_force_never_replaces_what_the_user_put_there(finished, tmp_path, capsys):
    out = interrupted_force_run(finished, tmp_path)
    out.rename(tmp_path / "moved-away")
    out.mkdir()
    (out / "mine.txt").write_text("my own folder")
    rc, err = run(["train", "--resume", f"{out}.partial", "--quiet"], capsys)
    assert rc == 2 and "no longer holds the run this --force run replaces" in err
    assert f"the finished run is in '{out}.partial'" in err
    assert (out / "mine.txt").read_text() == "my own folder" and os.listdir(out) == ["mine.txt"]
    assert ckpt.is_finished(f"{out}.partial")
    # Once the user moves their folder away, the resume puts the run in its place.
    shutil.rmtree(out)
    rc, _ = run(["train", "--resume", f"{out}.partial", "--quiet"], capsys)
    assert rc == 0 and ckpt.is_finished(out) and not Path(f"{out}.partial").exists()


def test_resume_of_force_replaces_the_run_it_was_made_for(finished, tmp_path, capsys):
    out = interrupted_force_run(finished, tmp_path)
    rc, _ = run(["train", "--resume", f"{out}.partial", "--quiet"], capsys)
    assert rc == 0 and json.loads((out / "run.json").read_text())["seed"] == 2
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ------------------------------------------------------------- 3. lock, then decide


def test_a_second_train_on_the_same_out_never_overwrites_the_first(tmp_path, capsys):
    """Both plan while --out is empty; the second starts only after the first has finished
    (the worst case of the race): it must see the finished run under the lock and refuse."""
    out = tmp_path / "run"
    first = runs.plan_new_run("kaiming", out=out, n_hidden=16,
                              config=runs.TrainConfig(steps=200, chunk=100))
    second = runs.plan_new_run("kaiming", seed=1, out=out, n_hidden=16,
                               config=runs.TrainConfig(steps=200, chunk=100))
    runs.train_run(first, progress=False, log=None)
    before = tree(out)
    with pytest.raises(runs.RunError, match="already holds a finished run"):
        runs.train_run(second, progress=False, log=None)
    assert tree(out) == before


def test_a_run_in_use_is_neither_written_nor_removed(tmp_path):
    out = tmp_path / "run"
    plan = runs.plan_new_run("kaiming", out=out, n_hidden=16,
                             config=runs.TrainConfig(steps=200, chunk=100))
    out.mkdir()
    held, release = threading.Event(), threading.Event()

    def hold():
        with rundir.run_lock(out):
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(60)
    try:
        with pytest.raises(runs.RunError, match="in use by another jaxmlp process"):
            runs.train_run(plan, progress=False, log=None)
        assert out.is_dir() and not os.listdir(out)  # not removed under the other's feet
    finally:
        release.set()
        t.join()


# ------------------------------------------------------------ 4. inputs are read once


def test_names_from_a_pipe_are_read_once_and_hashed(tmp_path, cli_env):
    out = tmp_path / "run"
    script = (f'"{sys.executable}" -m jaxmlp train {" ".join(SMALL)} --out "{out}" '
              f'--data <(cat "{DEFAULT_DATA}")')
    r = subprocess.run(["bash", "-c", script], env=cli_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    import hashlib

    assert ckpt.load_checkpoint(out).data_sha256 == hashlib.sha256(
        DEFAULT_DATA.read_bytes()).hexdigest()


def test_eval_refuses_names_the_run_was_not_trained_on(finished, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_bytes(DEFAULT_DATA.read_bytes())
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out), "--data", str(names)]) == 0
    capsys.readouterr()
    with open(names, "a") as f:
        f.write("zzyzx\n")  # edited after training
    rc, err = run(["eval", "--run", str(out)], capsys)
    assert rc == 2 and "is not the one run" in err and "SHA-256" in err
    rc, _ = run(["eval", "--run", str(out), "--data", str(DEFAULT_DATA)], capsys)
    assert rc == 0


def test_eval_works_from_any_directory(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _ = run(["eval", "--run", str(finished)], capsys)
    assert rc == 0


# ------------------------------------------------------- 5. temporary files and symlinks


def test_a_planted_symlink_never_redirects_a_write(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    victim = tmp_path / "outside.txt"
    victim.write_text("precious")
    (out / ckpt.METRICS_FILE).unlink()  # unfinished: the resume writes every result again
    for name in ckpt.RUN_FILES:
        (out / f".{name}.tmp").symlink_to(victim)
    rc, _ = run(["train", "--resume", str(out), "--quiet"], capsys)
    assert rc == 0 and victim.read_text() == "precious" and ckpt.is_finished(out)
    ckpt.write_atomic(out / "x.json", "{}")  # the mechanism itself, for any file
    assert victim.read_text() == "precious"


# ------------------------------------------------------- 8. paths, pipes, encodings


def test_force_refuses_to_replace_the_directory_one_is_in(finished, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    monkeypatch.chdir(out)
    before = tree(tmp_path)
    rc, err = run(["train", *SMALL, "--out", ".", "--force"], capsys)
    assert rc == 2 and "holds the current directory" in err
    assert tree(tmp_path) == before


def test_force_through_a_symlink_replaces_its_target(finished, tmp_path, capsys):
    real = tmp_path / "real"
    shutil.copytree(finished, real)
    (tmp_path / "link").symlink_to(real)
    rc, _ = run(["train", *SMALL, "--out", str(tmp_path / "link"), "--force", "--seed", "3"],
                capsys)
    assert rc == 0 and (tmp_path / "link").is_symlink()
    assert json.loads((real / "run.json").read_text())["seed"] == 3
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


@pytest.mark.parametrize("name", ["a" * 250, "b" * 300])
def test_a_name_too_long_is_one_line(name, tmp_path, capsys):
    rc, err = run(["train", *SMALL, "--out", str(tmp_path / name)], capsys)
    assert rc == 2 and "File name too long" in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_a_closed_pipe_ends_quietly(finished, cli_env):
    r = subprocess.run(f'"{sys.executable}" -m jaxmlp sample --run "{finished}" -n 20000 | true',
                       shell=True, executable="/bin/bash", env=cli_env, capture_output=True,
                       text=True, timeout=300)
    assert r.stderr == ""


def test_names_the_terminal_cannot_show_are_one_line(tmp_path, cli_env):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["zoë", "chloé", "renée", "añez"] * 50 + ["anna"] * 20))
    out = tmp_path / "run"
    env = {**cli_env, "PYTHONIOENCODING": "ascii"}
    subprocess.run([sys.executable, "-m", "jaxmlp", "train", *SMALL, "--out", str(out),
                    "--data", str(names)], env=env, check=True, capture_output=True,
                   timeout=300)
    r = subprocess.run([sys.executable, "-m", "jaxmlp", "sample", "--run", str(out), "-n", "200"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "PYTHONIOENCODING=utf-8" in r.stderr


def test_a_full_disk_is_one_line_and_the_advice_is_true(tmp_path, capsys, monkeypatch):
    """The disk fills before the first checkpoint: no checkpoint to keep, and the advice given
    (--resume) then works."""
    import errno

    out = tmp_path / "run"
    real = ckpt.write_atomic

    def full(path, data):
        if Path(path).name == ckpt.CKPT_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "write_atomic", full)
    rc, err = run(["train", *SMALL, "--out", str(out)], capsys)
    assert rc == 2 and "No space left on device" in err and "no checkpoint was written" in err
    assert "previous checkpoint is kept" not in err and f"--resume {out}" in err
    monkeypatch.setattr(ckpt, "write_atomic", real)
    rc, _ = run(["train", "--resume", str(out), "--quiet"], capsys)
    assert rc == 0 and ckpt.is_finished(out)


# ------------------------------------------------ 11. a run stopped before its checkpoint


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_retrained(tmp_path,
                                                                              capsys):
    out = tmp_path / "run"
    plan = runs.plan_new_run("kaiming", out=out, n_hidden=16,
                             config=runs.TrainConfig(steps=200, chunk=100))
    out.mkdir()
    ckpt.write_json(out / ckpt.SPEC_FILE, plan.spec.to_json())  # then the kill
    (out / f".{ckpt.CKPT_FILE}.tmp").write_bytes(b"half")
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    rc, _ = run(["train", "--resume", str(out), "--quiet"], capsys)
    assert rc == 0 and ckpt.is_finished(out)
    rc, _ = run(["train", "--stage", "kaiming", *SMALL, "--out", str(twin)], capsys)
    assert rc == 0 and ckpt.is_finished(twin)
    a, b = (json.loads((d / ckpt.METRICS_FILE).read_text()) for d in (out, twin))
    assert a["val"] == b["val"]  # the same run either way


# ----------------------------------------------- 10. batch norm with tiny minibatches


def test_identical_examples_under_batch_norm_say_the_real_cause(tmp_path, capsys):
    rc, err = run(["train", "--batch-size", "2", "--steps", "300", "--quiet", "--out",
                   str(tmp_path / "a")], capsys)
    assert rc == 2 and "examples of its minibatch are the same" in err
    assert "--bn-epsilon 1e-5" in err and "lower the learning rate" not in err
    rc, _ = run(["train", "--batch-size", "2", "--steps", "300", "--quiet", "--bn-epsilon",
                 "1e-5", "--out", str(tmp_path / "b")], capsys)
    assert rc == 0


def test_tiny_batches_in_the_deep_network_say_the_real_cause(tmp_path, capsys):
    rc, err = run(["train", "--stage", "deep", "--batch-size", "2", "--steps", "1000",
                   "--quiet", "--out", str(tmp_path / "d")], capsys)  # NaN near step 115
    assert rc == 2 and "examples per minibatch, batch norm's gradient grows" in err
    assert "--batch-size 8 or more" in err
