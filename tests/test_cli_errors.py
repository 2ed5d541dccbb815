"""Every bad input a user can type: exit code 2, one line on stderr, no traceback, and no file
of an earlier run changed (nor any file created)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flax import serialization

from jaxmlp import checkpoint as ckpt
from jaxmlp.cli import main
from jaxmlp.data import DEFAULT_DATA

NAMES = DEFAULT_DATA.read_text().split()


@pytest.fixture(scope="module")
def ws(tiny_run, tmp_path_factory):
    """A workspace of good and damaged runs and data files (module-wide: tests only read it)."""
    ws = tmp_path_factory.mktemp("ws")
    for name in ("run", "unfinished", "truncated", "garbage", "foreign", "bitflip", "badspec",
                 "nockpt", "other_shape"):
        shutil.copytree(tiny_run, ws / name)
    (ws / "unfinished" / ckpt.METRICS_FILE).unlink()
    blob = (tiny_run / ckpt.CKPT_FILE).read_bytes()
    (ws / "truncated" / ckpt.CKPT_FILE).write_bytes(blob[: len(blob) // 2])
    (ws / "garbage" / ckpt.CKPT_FILE).write_bytes(bytes(range(256)) * 40)
    (ws / "foreign" / ckpt.CKPT_FILE).write_bytes(serialization.msgpack_serialize({"step": 3}))
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01  # one bit inside the parameters: msgpack still parses
    (ws / "bitflip" / ckpt.CKPT_FILE).write_bytes(bytes(flipped))
    spec = (tiny_run / ckpt.SPEC_FILE).read_text()
    (ws / "badspec" / ckpt.SPEC_FILE).write_text(spec[: len(spec) // 2])
    (ws / "nockpt" / ckpt.CKPT_FILE).unlink()
    other = json.loads(spec)
    other["model"]["n_hidden"] = 32
    (ws / "other_shape" / ckpt.SPEC_FILE).write_text(json.dumps(other))
    (ws / "empty_dir").mkdir()
    (ws / "notrun").mkdir()
    (ws / "notrun" / "notes.txt").write_text("my notes\n")
    (ws / "afile").write_text("not a directory\n")

    d = ws / "data"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("\n   \n\t\n\n")
    (d / "latin1.txt").write_bytes("\n".join(["jos\xe9"] * 20).encode("latin-1"))
    (d / "long.txt").write_text("\n".join([*NAMES[:20], "a" * 5000]))
    (d / "dot.txt").write_text("\n".join([*NAMES[:20], "mr.smith"]))
    (d / "tab.txt").write_text("\n".join([*NAMES[:20], "anna\tmaria"]))
    (d / "nul.txt").write_text("\n".join([*NAMES[:20], "ann\x00a"]))
    (d / "few.txt").write_text("\n".join(NAMES[:5]))
    (d / "accents.txt").write_text("\n".join([*NAMES[:50], "zoë", "chloé"]))
    (d / "other.txt").write_text("\n".join(NAMES[:1000]))
    return ws


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root, with the SHA-256 of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


BAD = [
    # hyperparameters
    (["train", "--steps", "0"], "steps must be a positive integer"),
    (["train", "--steps", "-5"], "steps must be a positive integer"),
    (["train", "--steps", "3000000000"], "up to 2,147,483,647"),
    (["train", "--steps", "1e5"], "invalid int value"),
    (["train", "--batch-size", "0"], "batch size must be a positive integer"),
    (["train", "--batch-size", "1"], "batch size 1 leaves batch norm"),
    (["train", "--block-size", "0"], "block_size must be a positive integer"),
    (["train", "--n-embd", "0"], "n_embd must be a positive integer"),
    (["train", "--n-hidden", "-4"], "n_hidden must be a positive integer"),
    (["train", "--block-size", "1000"], "block_size must be at most 257"),
    (["train", "--n-hidden", "100000000"], "parameters (at most 268,435,456)"),
    (["train", "--batch-size", "1000000"], "larger than the training set (182,625 examples)"),
    (["train", "--lr", "0"], "learning rates must be positive"),
    (["train", "--lr=-0.1,0.01"], "learning rates must be positive"),
    (["train", "--lr", "-0.1"], "learning rates must be positive"),
    (["train", "--lr", "nan"], "learning rates must be positive and finite"),
    (["train", "--lr", "inf"], "learning rates must be positive and finite"),
    (["train", "--lr", "fast"], "expected comma-separated numbers"),
    (["train", "--lr="], "the schedule has 0 rate(s)"),
    (["train", "--lr", "0.1,0.01,0.001", "--lr-boundaries", "5000"], "one more rate than"),
    (["train", "--lr-boundaries", "1000,2000"], "one more rate than boundaries"),
    (["train", "--lr", "0.1,0.01,0.001", "--lr-boundaries", "200,100"],
     "boundaries must be positive and increasing"),
    (["train", "--lr-boundaries", "0"], "boundaries must be positive and increasing"),
    (["train", "--lr-boundaries", "x"], "expected comma-separated integers"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every must be a positive"),
    (["train", "--seed", "-1"], "--seed must be between 0 and 4294967295"),
    (["train", "--seed", str(2**32)], "--seed must be between 0 and 4294967295"),
    (["train", "--stage", "resnet"], "unknown stage 'resnet'"),
    (["train", "--optimizer", "rmsprop"], "invalid choice"),
    # the data file
    (["train", "--data", "missing.txt"], "does not exist"),
    (["train", "--data", "."], "is a directory"),
    (["train", "--data", "data/empty.txt"], "has no names"),
    (["train", "--data", "data/blank.txt"], "has no names"),
    (["train", "--data", "data/latin1.txt"], "is not UTF-8 text"),
    (["train", "--data", "data/long.txt"], "5,000 characters long"),
    (["train", "--data", "data/dot.txt"], "'.' is the end token"),
    (["train", "--data", "data/tab.txt"], "whitespace"),
    (["train", "--data", "data/nul.txt"], "control characters"),
    (["train", "--data", "data/few.txt"], "needs at least 10"),
    (["train", "--data", "/dev/null"], "is not a regular file"),
    (["train", "--data", "afile/names.txt"], "cannot open data file"),
    # --out
    (["train", "--out", "run"], "already holds a finished run; pass --force"),
    (["train", "--out", "unfinished"], "holds an unfinished run; continue it with --resume"),
    (["train", "--out", "afile"], "is a file"),
    (["train", "--out", "afile/sub"], "is a file; choose another --out"),
    (["train", "--out", "notrun"], "holds no jaxmlp run"),
    (["train", "--out", "notrun", "--force"], "holds no jaxmlp run"),
    # --resume
    (["train", "--resume", "run"], "already finished"),
    (["train", "--resume", "missing"], "does not exist"),
    (["train", "--resume", "afile"], "is a file, not a directory"),
    (["train", "--resume", "empty_dir"], "is not a jaxmlp run directory"),
    (["train", "--resume", "unfinished", "--steps", "10", "--lr", "1"], "drop --lr, --steps"),
    (["train", "--resume", "unfinished", "--force"], "drop --force"),
    (["train", "--resume", "unfinished", "--out", "elsewhere"], "drop --out"),
    (["train", "--resume", "unfinished", "--checkpoint-every", "0"], "--checkpoint-every must"),
    (["train", "--resume", "unfinished", "--data", "data/other.txt"], "is not the one run"),
    (["train", "--resume", "unfinished", "--data", "data/accents.txt"], "'éë', which the run"),
    (["train", "--resume", "truncated"], "is truncated or corrupted (it does not parse)"),
    (["train", "--resume", "garbage"], "is truncated or corrupted (it does not parse)"),
    (["train", "--resume", "foreign"], "is truncated or corrupted (not a jaxmlp checkpoint)"),
    (["train", "--resume", "bitflip"], "checksum mismatch"),
    (["train", "--resume", "badspec"], "run.json' is corrupted"),
    (["train", "--resume", "nockpt"], "checkpoint.msgpack' is missing"),
    (["train", "--resume", "other_shape"], "written by another run (model.n_hidden 16"),
    # eval
    (["eval"], "the following arguments are required: --run"),
    (["eval", "--run", "missing"], "does not exist"),
    (["eval", "--run", "afile"], "is a file, not a directory"),
    (["eval", "--run", "empty_dir"], "is not a jaxmlp run directory"),
    (["eval", "--run", "truncated"], "is truncated or corrupted"),
    (["eval", "--run", "bitflip"], "checksum mismatch"),
    (["eval", "--run", "badspec"], "is corrupted"),
    (["eval", "--run", "other_shape"], "written by another run"),
    (["eval", "--run", "run", "--data", "missing.txt"], "does not exist"),
    (["eval", "--run", "run", "--data", "data/accents.txt"], "which the run's vocabulary"),
    # sample
    (["sample", "--run", "run", "-n", "0"], "-n must be a number of names from 1"),
    (["sample", "--run", "run", "-n", "-3"], "-n must be a number of names from 1"),
    (["sample", "--run", "run", "-n", "1000000"], "-n must be a number of names from 1"),
    (["sample", "--run", "run", "--seed", "-2"], "--seed must be between"),
    (["sample", "--run", "missing"], "does not exist"),
    (["sample", "--run", "garbage"], "it does not parse"),
    (["eval", "--run", "foreign"], "not a jaxmlp checkpoint"),
    # sizes that pass the simple checks but not the machine's memory
    (["train", "--batch-size", "100000", "--n-hidden", "20000"], "the run would need about"),
    # numbers that would overflow later
    (["train", "--lr", "0.1,0.01", "--lr-boundaries", "3000000000"], "at most 2,147,483,647"),
    (["train", "--lr", "1e39"], "overflows float32"),
    (["train", "--lr", "1e-300"], "underflows float32"),
    (["train", "--stage", "kaiming", "--bn-epsilon", "1e-5"], "has no batch norm"),
    (["train", "--bn-epsilon", "-1"], "--bn-epsilon must be a finite number >= 0"),
    # every subcommand checks what train checks
    (["diagnose", "--seed", "-1"], "--seed must be between"),
    (["diagnose", "--seed", str(2**64)], "--seed must be between"),
    (["diagnose", "--threshold", "0"], "--threshold must lie strictly between 0 and 1"),
    (["diagnose", "--batch-size", "200000"], "larger than the training set"),
    (["diagnose", "--batch-size", "0"], "batch size must be a positive"),
    (["reproduce", "--seed", "-1"], "--seed must be between"),
    (["reproduce", "--stages", ""], "no stages to reproduce"),
    (["sweep", "--stages", ""], "--stages is empty"),
    (["sweep", "--stages", ","], "--stages is empty"),
    (["sweep", "--seeds", "100000"], "runs one sweep trains"),
    (["sweep", "--seeds", str(2**64)], "runs one sweep trains"),
    (["sweep", "--cpu-devices", str(2**64)], "--cpu-devices must be from 1"),
    (["sweep", "--stages", "kaiming", "--seeds", "60000", "--steps", "2000000"],
     "would need about"),
    (["bench", "--out", "run"], "is not empty; pass --force"),
    # no command at all
    ([], "the following arguments are required"),
    (["fly"], "invalid choice"),
]


@pytest.mark.parametrize("argv, match", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv, match, ws, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    assert run_cli(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and match in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(ws) == before


def test_the_installed_command_prints_one_line(ws, cli_env):
    """The real entry point (a new process), not only main()."""
    r = subprocess.run([sys.executable, "-m", "jaxmlp", "train", "--resume", str(ws / "bitflip")],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.startswith("jaxmlp train: error: checkpoint ") and "checksum" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_unfinished_run_can_be_sampled_with_a_note(ws, capsys):
    assert main(["sample", "--run", str(ws / "unfinished"), "-n", "3"]) == 0
    captured = capsys.readouterr()
    assert "is unfinished (step 3,000 of 3,000)" in captured.err
    assert len(captured.out.split()) == 3


def test_force_keeps_the_earlier_run_until_the_new_one_finishes(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    args = ["train", "--out", str(run), "--force", "--stage", "kaiming", "--n-hidden", "32",
            "--steps", "200", "--checkpoint-every", "100", "--quiet"]

    # A --force run that diverges: the earlier run is untouched, the new one kept aside.
    assert main([*args, "--lr", "0.1,1e38", "--lr-boundaries", "150"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "lower the learning rate (e.g. --lr 0.01,1e+37)" in err
    assert f"the last good checkpoint, step 100, is kept in {run}.partial" in err
    assert snapshot(run) == before
    assert ckpt.load_checkpoint(f"{run}.partial").step == 100

    # Enormous but finite weights: the training losses stay finite, the evaluation does not.
    assert main([*args, "--lr", "0.1,1e30", "--lr-boundaries", "150"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "training diverged: the final train loss is nan" in err
    assert snapshot(run) == before

    # A --force run that finishes replaces it (and clears the leftovers of the failed one).
    # (The settings of test_cli's end-to-end run: in one session its compilation is reused.)
    assert main(["train", "--out", str(run), "--force", "--stage", "batchnorm", "--steps", "2000",
                 "--n-hidden", "50", "--quiet"]) == 0
    assert json.loads((run / ckpt.SPEC_FILE).read_text())["model"]["n_hidden"] == 50
    assert json.loads((run / ckpt.METRICS_FILE).read_text())["steps"] == 2000
    assert ckpt.load_checkpoint(run).step == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
