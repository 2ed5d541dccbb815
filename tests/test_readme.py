"""The README and docs/ are what a user reads first: their commands, options, code and links must
work as written."""

import functools
import re
import shlex
from pathlib import Path

import pytest

from jaxmlp.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {p: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}


def section(title: str, text: str = README) -> str:
    """The text of the `## title` section, up to the next `## `."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text + "\n## ", re.S | re.M)
    assert m, f"no '## {title}' section"
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


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    return sub.choices


def test_every_command_line_in_the_readme_and_docs_parses():
    """Each `jaxmlp ...` line of a bash block names a real command with real options."""
    subs = _subcommands()
    checked = 0
    for text in (README, *DOCS.values()):
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.splitlines():
                m = re.match(r"\s*(?:\.venv/bin/)?jaxmlp (\w+)(.*)", line.split("#")[0])
                if not m:
                    continue
                command, rest = m.groups()
                assert command in subs, f"unknown command `jaxmlp {command}`"
                options = {o for a in subs[command]._actions for o in a.option_strings}
                for word in shlex.split(rest.replace("[", " ").replace("]", " ")
                                        .replace("|", " ")):
                    if word.startswith("-"):
                        assert word in options, f"`jaxmlp {command}` has no option {word}"
                checked += 1
    assert checked >= 20


def test_the_train_options_listed_are_the_real_ones():
    text = section("Command line")
    listed = set(re.findall(r"`(--[a-z-]+)", text.split("`jaxmlp train` options:")[1]
                            .split("A run directory")[0]))
    real = {o for a in _subcommands()["train"]._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}
    assert listed - {"--help"} == real


def test_every_relative_link_resolves():
    checked = 0
    for path, text in [(ROOT / "README.md", README), *DOCS.items()]:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            file = target.split("#")[0]
            assert (path.parent / file).exists(), f"{path.name} links to missing {target}"
            checked += 1
    assert checked >= 15


def test_no_page_cites_a_file_outside_the_repository():
    """No path climbs out of the repository, and every top-level document a page names (an
    upper-case `NAME.md`) is one the repository holds."""
    own = {p.name for p in ROOT.glob("*.md")}
    for path, text in [(ROOT / "README.md", README), *DOCS.items()]:
        for climb in re.findall(r"(?:\.\./)+[\w./-]*", text):
            where = (path.parent / climb).resolve()
            assert where.is_relative_to(ROOT) and where.exists(), (path.name, climb)
        for name in re.findall(r"\b[A-Z][A-Z_]+\.md\b", text):
            assert name in own, (path.name, name)


def test_every_docs_page_opens_with_what_it_answers():
    for path, text in DOCS.items():
        first = text.split("\n\n")[1]
        assert first.startswith("This page answers"), path.name


@pytest.mark.parametrize("where", ["README Python", "README Your optimizer, your module, your grid",
                                   "docs/functional.md"])
def test_python_examples_run(where, tmp_path, monkeypatch):
    """The Python blocks, run in order with their step counts cut to a few."""
    text = section(where[7:]) if where.startswith("README ") else DOCS[ROOT / where]
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    assert code
    code = re.sub(r"\b(200|20)_000\b", "40", code)
    # A run planned without a config trains the lecture's 200,000 steps: 40 here too.
    from jaxmlp import runs
    from jaxmlp.train import TrainConfig

    monkeypatch.setattr(runs, "TrainConfig", functools.partial(TrainConfig, steps=40))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "names.txt").symlink_to(ROOT / "data" / "names.txt")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {})


def _documented_parameters(text: str, start: int) -> list[str]:
    """The parameter names of the `name(...)` at text[start] (the open parenthesis): the first
    word of each top-level argument, shapes such as `X (N, T)` and defaults left out."""
    depth, args, current = 0, [], ""
    for ch in text[start + 1:]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(current)
            current = ""
        elif ch != "`":
            current += ch
    args.append(current)
    names = []
    for arg in args:
        m = re.match(r"\s*(\*{0,2})([A-Za-z_]\w*)", arg)
        if m:
            names.append(m.group(1) + m.group(2))
    return names


def test_docs_api_has_an_entry_for_every_public_name():
    """docs/api.md names everything in jaxmlp.__all__, and every `name(...)` it writes has the
    real parameters: each documented one exists, none required is left out."""
    import inspect

    import jaxmlp

    api = DOCS[ROOT / "docs" / "api.md"]
    for name in jaxmlp.__all__:
        assert re.search(rf"`{name}\b", api), f"docs/api.md has no entry for {name}"
        obj = getattr(jaxmlp, name)
        if not callable(obj) or (isinstance(obj, type) and issubclass(obj, Exception)
                                 and name != "DivergenceError"):
            continue
        calls = [m.end() - 1 for m in re.finditer(rf"`{name}\(", api)]
        assert calls, f"docs/api.md gives no signature `{name}(...)`"
        params = inspect.signature(obj).parameters
        real = set(params)
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        required = {p for p, v in params.items() if v.default is v.empty
                    and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
        for at in calls:
            documented = _documented_parameters(api, at)
            for p in documented:
                if p.startswith("**"):
                    assert var_kw, f"{name} takes no **{p[2:]}"
                else:
                    assert p.lstrip("*") in real, f"docs/api.md: {name} has no parameter {p}"
            missing = required - set(documented)
            assert not missing, f"docs/api.md: {name}(...) leaves out {sorted(missing)}"
