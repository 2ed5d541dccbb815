"""The experiments/ scripts still run (with their step counts cut): they regenerate the README's
numbers and figures, so they must not rot between the times someone re-measures."""

import runpy
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def run_script(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXPERIMENTS / name), run_name="__main__")


def test_figures_quick(tmp_path, monkeypatch, capsys):
    run_script("figures.py", ["--quick", "--out", str(tmp_path)], monkeypatch)
    pngs = list(tmp_path.rglob("*.png"))
    assert len(pngs) >= 20 and all(p.stat().st_size > 10_000 for p in pngs)
    assert (tmp_path / "summary.json").is_file()


def test_deep_training(tmp_path, monkeypatch, capsys):
    run_script("deep_training.py", ["--steps", "200", "--runs", str(tmp_path / "runs"),
                                    "--out", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "| deep | jaxmlp | 3.2761 |" in out and "| deep-nobn | jaxmlp |" in out
    assert (tmp_path / "deep-loss.png").stat().st_size > 10_000


@pytest.mark.parametrize("name, argv, expect", [
    ("update_ratios_torch.py", ["--steps", "30"], "linear15/kernel"),
    ("compare_torch.py", ["--steps", "30"], "first step with a relative difference above 1e-4: "
                                            "none"),
])
def test_torch_comparisons(name, argv, expect, monkeypatch, capsys):
    pytest.importorskip("torch")
    run_script(name, argv, monkeypatch)
    assert expect in capsys.readouterr().out
