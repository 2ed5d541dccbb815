"""The deep network's variants from the command line, end to end: `--norm`, `--activation`,
`--gain`, `--depth` on `train` (recorded in run.json, resumed exactly), `diagnose` and
`sweep` (a sweep run equal to the same `train` run); refused in one line where they do not
apply."""

import json

import pytest

from jaxmlp import checkpoint as ckpt
from jaxmlp.cli import main

VARIANT = ["--norm", "layernorm", "--activation", "relu", "--gain", "1.4", "--depth", "3"]
TRAIN = ["train", "--stage", "deep", *VARIANT, "--n-hidden", "16", "--steps", "60",
         "--checkpoint-every", "20", "--quiet"]


def one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


def test_train_records_the_variants_and_resume_continues_them_exactly(tmp_path, capsys,
                                                                      monkeypatch):
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main([*TRAIN, "--out", str(whole)]) == 0
    model = json.loads((whole / ckpt.SPEC_FILE).read_text())["model"]
    assert model["class"] == "DeepMLP"
    assert (model["norm"], model["activation"], model["gain"], model["depth"]) == (
        "layernorm", "relu", 1.4, 3)
    assert model["n_hidden"] == 16

    real_save, saves = ckpt.save_checkpoint, []

    def save_then_stop(*args, **kwargs):  # Ctrl-C right after the checkpoint of step 20
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    assert main([*TRAIN, "--out", str(run)]) == 130
    monkeypatch.undo()
    assert ckpt.load_checkpoint(run).step == 20
    capsys.readouterr()
    # The run's own settings decide: a variant flag on --resume is refused, not mixed in.
    assert main(["train", "--resume", str(run), "--norm", "none"]) == 2
    one_line_error(capsys, "--resume continues a run with its own saved settings; drop --norm")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    for name in (ckpt.SPEC_FILE, ckpt.CKPT_FILE, ckpt.LOSSES_FILE):
        assert (run / name).read_bytes() == (whole / name).read_bytes(), name
    m = [json.loads((d / ckpt.METRICS_FILE).read_text()) for d in (run, whole)]
    assert m[0]["val"] == m[1]["val"] and m[0]["resumed_from_step"] == 20


def test_a_sweep_of_a_variant_equals_the_same_train_run(tmp_path, capsys):
    variant = ["--norm", "none", "--activation", "relu", "--gain", "1.4", "--depth", "1"]
    out = tmp_path / "sweep"
    assert main(["sweep", "--stages", "deep", *variant, "--seeds", "2", "--steps", "40",
                 "--out", str(out), "--quiet"]) == 0
    entry = json.loads((out / "sweep.json").read_text())["deep"]
    assert entry["model"] == {"norm": "none", "activation": "relu", "gain": 1.4, "depth": 1}
    assert entry["pytorch"] is None  # not the lecture's network: no PyTorch figures beside it
    assert len(entry["val"]) == 2
    run = tmp_path / "run"
    assert main(["train", "--stage", "deep", *variant, "--seed", "1", "--steps", "40",
                 "--out", str(run), "--quiet"]) == 0
    val = json.loads((run / ckpt.METRICS_FILE).read_text())["val"]
    assert abs(entry["val"][1] - val) < 1e-5


def test_diagnose_takes_the_variants(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--stage", "deep", "--norm", "none", "--activation", "relu",
                 "--gain", "1.4", "--depth", "2", "--steps", "10", "--every", "5",
                 "--out", str(out)]) == 0
    report = json.loads((out / "diagnostics.json").read_text())
    assert report["model"] == {"norm": "none", "activation": "relu", "gain": 1.4, "depth": 2}
    # depth 2 without normalisation: linear0 relu1 linear2 relu3, then the output layer
    assert [a["layer"] for a in report["activations"]] == ["relu1", "relu3"]
    assert (out / "activations.png").is_file()


@pytest.mark.parametrize("argv, says", [
    (["train", "--stage", "kaiming", "--norm", "layernorm"],
     "--norm sets the deep network's normalisation (batchnorm, layernorm or none); stage "
     "kaiming is the shallow MLP, which has none (use --stage deep or deep-nobn)"),
    (["train", "--stage", "batchnorm", "--activation", "relu"], "stage batchnorm is the shallow"),
    (["train", "--stage", "deep", "--depth", "0"],
     "--depth must be a whole number of hidden blocks from 1 to 100, got 0"),
    (["train", "--stage", "deep", "--gain", "-1"], "--gain must be a positive finite number"),
    (["train", "--stage", "deep-nobn", "--gain", "nan"], "--gain must be a positive finite"),
    (["diagnose", "--stage", "tanh-fix", "--gain", "2"], "stage tanh-fix is the shallow MLP"),
    (["diagnose", "--stage", "deep", "--depth", "0"], "--depth must be a whole number"),
    (["sweep", "--stages", "deep,kaiming", "--norm", "none"], "stage kaiming is the shallow"),
    (["sweep", "--stages", "deep", "--depth", "101"], "from 1 to 100, got 101"),
])
def test_a_variant_where_it_does_not_apply_is_refused_in_one_line(argv, says, tmp_path,
                                                                   capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    one_line_error(capsys, says)
    assert not out.exists()


def test_a_variant_flag_outside_its_choices_is_a_usage_error(capsys):
    assert main(["train", "--stage", "deep", "--norm", "groupnorm"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'groupnorm'" in err and "Traceback" not in err
