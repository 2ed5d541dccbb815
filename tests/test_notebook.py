"""experiments/lecture.ipynb, the lecture's companion, is what experiments/lecture.py makes, is
committed executed at full fidelity, and still executes (in quick mode, with or without torch)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "lecture.py"
NOTEBOOK = ROOT / "experiments" / "lecture.ipynb"

_spec = importlib.util.spec_from_file_location("make_notebook",
                                               ROOT / "experiments" / "make_notebook.py")
make_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_notebook)


def source(cell) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def outputs(nb, output_type=None, mime=None):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if (output_type is None or o["output_type"] == output_type)
            and (mime is None or mime in o.get("data", {}))]


def text(nb) -> str:
    return "".join("".join(o["text"]) if o["output_type"] == "stream"
                   else "".join(o.get("data", {}).get("text/plain", ""))
                   for o in outputs(nb))


@pytest.fixture(scope="module")
def committed():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def test_split_cells():
    script = "import x\n\n# %% [markdown]\n# # Title\n#\n# text `a`\n\n# %%\ny = 1\n# %%\n\n"
    assert make_notebook.split_cells(script) == [
        ("code", "import x"), ("markdown", "# Title\n\ntext `a`"), ("code", "y = 1")]


def test_the_notebook_is_the_script(committed):
    """Same cells as the script makes, same types, same order, ids from the index."""
    expected = make_notebook.split_cells(SCRIPT.read_text(encoding="utf-8"))
    assert [(c["cell_type"], source(c)) for c in committed["cells"]] == expected, \
        "experiments/lecture.ipynb is stale: run `python experiments/make_notebook.py`"
    assert [c["id"] for c in committed["cells"]] == [f"cell-{i:03d}"
                                                     for i in range(len(expected))]


def test_the_notebook_was_executed_at_full_fidelity(committed):
    code = [c for c in committed["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert sum(bool(c["outputs"]) for c in code) >= 0.9 * len(code)
    assert not outputs(committed, "error")
    assert len(outputs(committed, mime="image/png")) >= 10
    assert all("execution" not in c["metadata"] for c in committed["cells"])
    out = text(committed)
    assert "QUICK mode" not in out and "200,000 steps per run, 8 seeds per stage" in out
    assert "Skipped" not in out  # executed with torch: the retrace shows its numbers


def test_the_notebook_agrees_with_the_readme(committed):
    """Each stage's seed-0 train / val / test in the notebook's table is the README's."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    out = text(committed)
    for stage in ("original", "softmax-fix", "tanh-fix", "kaiming", "batchnorm"):
        row = re.search(rf"^\| {stage} \|(.*)$", readme, re.M).group(1).split("|")
        seed0 = row[2].strip()
        mean, ci = row[3].strip().split(" ± ")
        line = re.search(rf"^ *{stage} \|.*$", out, re.M).group(0)
        assert seed0 in line and f"{mean} ± {ci}" in line, (stage, seed0, line)


def test_the_notebook_executes_in_quick_mode():
    """Executed as CI does, in quick mode (about a minute on 2 cores, mostly compilation)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = make_notebook.execute(make_notebook.build(), quick=True, timeout=600)
    assert not make_notebook.errors(nb)
    assert len(outputs(nb, mime="image/png")) >= 10
    assert "QUICK mode" in text(nb)
