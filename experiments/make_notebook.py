"""Make experiments/lecture.ipynb from the percent script experiments/lecture.py and execute it.

    python experiments/make_notebook.py            # full fidelity, rewrites lecture.ipynb
    python experiments/make_notebook.py --quick    # few steps (JAXMLP_LECTURE_QUICK=1)
    python experiments/make_notebook.py --reuse-outputs  # after editing markdown cells only

The script is the source of truth: `# %%` starts a code cell, `# %% [markdown]` a markdown
cell whose lines lose their leading `# `. The notebook runs in a python3 kernel started from
this interpreter, with this checkout first on PYTHONPATH. Cell ids come from the cell's index
and no execution timestamps are kept, so re-executing changes only what the outputs change.
Needs `pip install -e '.[notebook]'` (nbformat, nbclient, ipykernel); no jupytext.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "lecture.py"
NOTEBOOK = ROOT / "experiments" / "lecture.ipynb"
QUICK_ENV = "JAXMLP_LECTURE_QUICK"
MARKER = re.compile(r"^# %%(?P<rest>.*)$")


def split_cells(text: str) -> list[tuple[str, str]]:
    """[(cell_type, source)] of a percent script, in order; empty cells are dropped."""
    cells: list[tuple[str, list[str]]] = []
    kind, lines = "code", []
    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            cells.append((kind, lines))
            kind = "markdown" if "[markdown]" in m["rest"] else "code"
            lines = []
        else:
            lines.append(line)
    cells.append((kind, lines))
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [re.sub(r"^# ?", "", line) if line.startswith("#") else line
                     for line in lines]
        source = "\n".join(lines).strip("\n")
        if source.strip():
            out.append((kind, source))
    return out


def build(script: Path = SCRIPT):
    """The unexecuted notebook of a percent script."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    for i, (kind, source) in enumerate(split_cells(script.read_text(encoding="utf-8"))):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(source, id=f"cell-{i:03d}"))
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    return nb


def kernel_env(quick: bool) -> dict[str, str]:
    """The kernel's environment: this checkout's jaxmlp first, the quick switch (with XLA's
    backend optimisations off), and no MPLBACKEND inherited from a headless shell."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("MPLBACKEND", None)
    if quick:  # a few hundred steps do not repay LLVM's optimisations: compile a third faster
        env[QUICK_ENV] = "1"
        env["XLA_FLAGS"] = " ".join(
            f for f in (env.get("XLA_FLAGS"), "--xla_backend_optimization_level=0") if f)
    else:
        env.pop(QUICK_ENV, None)
    return env


def execute(nb, quick: bool = False, timeout: int = 1800):
    """Execute `nb` in place in a fresh python3 kernel (this interpreter), from the repository
    root; returns it with outputs and no timing metadata."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, record_timing=False,
                            coalesce_streams=True, resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=kernel_env(quick))
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def reuse_outputs(nb, old) -> None:
    """Give `nb`'s code cells the outputs of the executed notebook `old`, which must have the
    same code cells (only markdown changed), so that a prose edit needs no re-execution."""
    new_code = [c for c in nb.cells if c.cell_type == "code"]
    old_code = [c for c in old.cells if c.cell_type == "code"]
    if [c.source for c in new_code] != [c.source for c in old_code]:
        raise SystemExit("--reuse-outputs: the code cells changed; re-execute the notebook")
    for new, prev in zip(new_code, old_code, strict=True):
        new.outputs, new.execution_count = prev.outputs, prev.execution_count
    nb.metadata = old.metadata


def errors(nb) -> list[str]:
    """The error outputs of an executed notebook, as 'cell N: ename: evalue'."""
    return [f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
            for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"execute with few steps ({QUICK_ENV}=1)")
    parser.add_argument("--out", type=Path, default=NOTEBOOK, help="default: %(default)s")
    parser.add_argument("--no-execute", action="store_true", help="write the cells only")
    parser.add_argument("--reuse-outputs", action="store_true",
                        help="keep the outputs of --out (its code cells must be unchanged)")
    args = parser.parse_args(argv)
    nb = build()
    if args.reuse_outputs:
        reuse_outputs(nb, nbformat.read(args.out, as_version=4))
    elif not args.no_execute:
        t0 = time.perf_counter()
        execute(nb, quick=args.quick)
        print(f"executed {len(nb.cells)} cells in {time.perf_counter() - t0:.0f} s")
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}")
    bad = errors(nb)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
