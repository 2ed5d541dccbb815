"""The README is what a user reads first: its commands, options and code must work as written."""

import re
import shlex
from pathlib import Path

import pytest

from jaxmlp.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the `## title` section, up to the next `## `."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README + "\n## ", re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_quick_start_is_two_commands_in_one_block():
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", section("Quick start"), re.S)
    assert len(blocks) == 1
    lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(lines) == 2
    assert "jaxmlp train" in lines[0] and "jaxmlp sample" in lines[0]
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "Quick start" in ci and "sed -n 2p" in ci  # CI runs the second line, verbatim


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    return sub.choices


def test_every_command_line_in_the_readme_parses():
    """Each `jaxmlp ...` line of a bash block names a real command with real options."""
    subs = _subcommands()
    checked = 0
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            m = re.match(r"\s*(?:\.venv/bin/)?jaxmlp (\w+)(.*)", line.split("#")[0])
            if not m:
                continue
            command, rest = m.groups()
            assert command in subs, f"README uses unknown command `jaxmlp {command}`"
            options = {o for a in subs[command]._actions for o in a.option_strings}
            for word in shlex.split(rest.replace("[", " ").replace("]", " ").replace("|", " ")):
                if word.startswith("-"):
                    assert word in options, f"`jaxmlp {command}` has no option {word}"
            checked += 1
    assert checked >= 15


def test_the_train_options_listed_are_the_real_ones():
    text = section("Command line")
    listed = set(re.findall(r"`(--[a-z-]+)", text.split("`jaxmlp train` options:")[1]
                            .split("A run directory")[0]))
    real = {o for a in _subcommands()["train"]._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}
    assert listed - {"--help"} == real


@pytest.mark.parametrize("title", ["Python", "Functional experimentation"])
def test_python_examples_run(title, tmp_path, monkeypatch):
    """The section's Python blocks, run in order with their step counts cut to a few."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", section(title), re.S))
    assert code
    code = re.sub(r"\b(200|20)_000\b", "40", code)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "names.txt").symlink_to(ROOT / "data" / "names.txt")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README {title}", "exec"), {})
