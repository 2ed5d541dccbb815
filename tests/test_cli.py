import json

import pytest

from jaxmlp.cli import main


def test_train_eval_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--stage", "batchnorm", "--steps", "2000", "--n-hidden", "50",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "      0/   2000:" in printed and "val" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in ("stage", "seed", "steps", "params", "train", "val", "test", "seconds",
                "us_per_step", "step_losses"):
        assert key in m
    assert m["steps"] == 2000 and m["params"] == 270 + 30 * 50 + 2 * 50 + 50 * 27 + 27
    assert list(m["step_losses"]) == ["0"] and 3.0 < m["step_losses"]["0"] < 3.6
    assert m["val"] < 2.9
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["eval", "--run", str(out)]) == 0
    lines = capsys.readouterr().out.split()
    assert lines[0] == "train" and abs(float(lines[3]) - m["val"]) < 1e-5

    assert main(["sample", "--run", str(out), "-n", "5", "--seed", "3"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) <= 5 and all(n.isalpha() and n.islower() for n in names)


@pytest.mark.parametrize("argv, match", [
    (["train", "--steps", "0"], "steps must be a positive"),
    (["train", "--batch-size", "1"], "batch size 1"),
    (["train", "--data", "/nonexistent/names.txt"], "does not exist"),
    (["train", "--stage", "resnet"], "unknown stage 'resnet'"),
    (["train", "--steps", "ten"], "invalid int value"),
    (["eval", "--run", "/nonexistent/run"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
