"""The docs describe the tree as it is, checked against the tree at test time:

- the README stays short (at most 300 lines) and every relative link in it and in docs/*.md resolves (file and
  heading anchor), every docs page is linked from the README, and the README's headline tables repeat
  docs/measurements.md's rows verbatim;
- the Layout table (docs/layout.md) has a row for every top-level script, package folder and `fcdiffusion/` module
  in `git ls-files`, and no row for a path that does not exist;
- the Scripts table (docs/scripts.md) has a row for every top-level script, and every flag a row names is one of
  that script's options (the usage line of its `--help`); every `python <script>.py --flag ...` command the docs show
  names an existing script and flags its `--help` mentions.

When the tree changes (a module added, moved or removed, a flag renamed), the docs are what must be fixed; each
failure lists the rows or commands to change.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LAYOUT = DOCS / "layout.md"
SCRIPTS = DOCS / "scripts.md"
MEASUREMENTS = DOCS / "measurements.md"
MAX_README_LINES = 300
SCRIPT_DIRS = ("", "benchmarks", "docs")  # where runnable scripts live: the root, benchmarks/, docs/
PACKAGES = ("ldm", "fcdiffusion")
SKIP_DIRS = {"__pycache__", "outputs", "lightning_logs", "node_modules"}  # for the walk without git
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w<>-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


# -- the tree ------------------------------------------------------------------------------------------------------

@cache
def tree_files() -> frozenset[str]:
    """The working tree's files as git sees them (tracked, or new and not ignored) that exist on disk; without git,
    every file outside hidden and output folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
            listed += [Path(folder, name).relative_to(ROOT).as_posix() for name in names]
    return frozenset(f for f in listed if f and (ROOT / f).is_file())


def scripts() -> set[str]:
    """Runnable scripts: `*.py` in the root, benchmarks/ and docs/."""
    return {f for f in tree_files() if f.endswith(".py") and f.rpartition("/")[0] in SCRIPT_DIRS}


def package_folders() -> set[str]:
    """Every package folder of ldm/ and fcdiffusion/ (a folder holding an `__init__.py`), as `path/`."""
    return {f[: -len("__init__.py")] for f in tree_files()
            if f.endswith("/__init__.py") and f.split("/")[0] in PACKAGES}


def fcdiffusion_modules() -> set[str]:
    return {f for f in tree_files()
            if f.startswith("fcdiffusion/") and f.endswith(".py") and not f.endswith("/__init__.py")}


def exists_in_tree(path: str) -> bool:
    """A file of the tree, or a folder (written `folder/` or `folder`) holding one."""
    files = tree_files()
    return path in files or any(f.startswith(path.rstrip("/") + "/") for f in files)


# -- Markdown ------------------------------------------------------------------------------------------------------

def split_cells(row: str) -> list[str]:
    """The cells of a table row; a `|` inside backticks or escaped as `\\|` does not split."""
    cells, cell, in_code, i = [], "", False, 0
    body = row.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    while i < len(body):
        char = body[i]
        if char == "\\" and body[i + 1: i + 2] == "|":
            cell, i = cell + "|", i + 2
            continue
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
        i += 1
    return cells + [cell.strip()]


def outside_code_blocks(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside ``` fences."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table of a Markdown text as (header cells, body rows of cells), tables inside fences excluded."""
    found, block = [], []
    for line in outside_code_blocks(text) + [""]:
        if line.strip().startswith("|"):
            block.append(split_cells(line))
            continue
        if len(block) >= 2 and all(re.fullmatch(r":?-{3,}:?", c) for c in block[1]):
            found.append((block[0], block[2:]))
        block = []
    return found


def table_with_header(path: Path, first_header: str) -> list[list[str]]:
    rows = [row for header, body in tables(path.read_text()) if header[0].lower() == first_header for row in body]
    assert rows, f"{path.relative_to(ROOT)} has no table whose first column is '{first_header}'"
    return rows


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text (lower case, punctuation dropped, spaces as '-', repeats -1, -2)."""
    seen: dict[str, int] = {}
    for line in outside_code_blocks(text):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# -- README and links ----------------------------------------------------------------------------------------------

def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines, over {MAX_README_LINES}: move detail to a "
                                       "docs/ page and link it")


def test_links_resolve():
    broken = []
    for page in doc_pages():
        for line in outside_code_blocks(page.read_text()):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (page.parent / file_part).resolve() if file_part else page
                name = f"{page.relative_to(ROOT)}: ({target})"
                if not linked.exists():
                    broken.append(f"{name}: no such file")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                    broken.append(f"{name}: no heading '#{anchor}' in {linked.relative_to(ROOT)}")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_readme_links_every_docs_page():
    readme = README.read_text()
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert "docs/demo.png" in readme, "the README no longer shows the demo screenshot docs/demo.png"


def test_readme_headline_tables_repeat_the_measurements():
    """A figure changed in one place and not the other would contradict itself: the README's measured tables are
    rows of docs/measurements.md, verbatim."""
    readme = README.read_text().split("## Measured figures", 1)[1].split("\n## ", 1)[0]
    measurements = {" | ".join(row) for _, body in tables(MEASUREMENTS.read_text()) for row in body}
    differing = [" | ".join(row) for _, body in tables(readme) for row in body
                 if " | ".join(row) not in measurements]
    assert not differing, "README rows not in docs/measurements.md:\n  " + "\n  ".join(differing)


# -- the Layout table ----------------------------------------------------------------------------------------------

def test_layout_table_matches_the_tree():
    rows, malformed = [], []
    for row in table_with_header(LAYOUT, "path"):
        path = re.fullmatch(r"`([^`\s]+)`", row[0])
        (rows.append(path.group(1)) if path else malformed.append(row[0]))
    required = scripts() | package_folders() | fcdiffusion_modules()
    listed = {r if (ROOT / r).is_file() or r.endswith("/") else r + "/" for r in rows}
    missing = sorted(required - listed)
    extra = sorted(r for r in rows if not exists_in_tree(r))
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    problems = [f"{what}: {items}" for what, items in (
        ("missing rows (add them)", missing), ("rows for paths that do not exist (remove them)", extra),
        ("repeated rows", repeated), ("rows whose first cell is not one `path`", malformed)) if items]
    assert not problems, "the Layout table in docs/layout.md is out of date:\n  " + "\n  ".join(problems)


# -- the Scripts table and the commands the docs show ---------------------------------------------------------------

@cache
def help_texts() -> dict[str, str]:
    """`python <script> --help` of every script, run once: each script's `main(["--help"])` in this process (the
    modules are imported once for all, instead of torch and Lightning once per script), its printout kept."""
    texts = {}
    for script in sorted(scripts()):
        name = "help_of_" + re.sub(r"\W", "_", script)
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
        spec.loader.exec_module(module)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
            module.main(["--help"])
        assert exited.value.code == 0, f"python {script} --help exited with {exited.value.code}"
        texts[script] = printed.getvalue()
    return texts


def options(help_text: str) -> set[str]:
    """The options argparse lists in the usage block (up to the first blank line) of a `--help` output."""
    usage = help_text.split("\n\n", 1)[0]
    return set(FLAG.findall(usage))


def known(flag: str, flags: set[str]) -> bool:
    """A flag as the docs write it is among `flags`; a placeholder such as `--teacher_<mode>` matches
    `--teacher_low_pass`, ..."""
    if flag in flags:
        return True
    pattern = re.sub(r"\\<\w+\\>|<\w+>", r"\\w+", re.escape(flag))
    return "<" in flag and any(re.fullmatch(pattern, f) for f in flags)


def test_scripts_table_matches_scripts_and_their_options():
    rows: dict[str, list[str]] = {}
    for row in table_with_header(SCRIPTS, "script"):
        script = re.match(r"`([^`\s]+)", row[0])
        assert script, f"docs/scripts.md: a row's first cell is not a `script`: {row[0]}"
        rows[script.group(1)] = row
    missing, extra = sorted(scripts() - set(rows)), sorted(set(rows) - scripts())
    helps = help_texts()
    unknown = [f"{script}: {flag}" for script, row in sorted(rows.items()) if script in helps
               for flag in sorted({f for cell in row[1:] for f in FLAG.findall(cell)})
               if not known(flag, options(helps[script]))]
    problems = [f"{what}: {items}" for what, items in (
        ("scripts without a row (add them)", missing), ("rows for scripts that do not exist (remove them)", extra),
        ("flags that are not the script's options (see its --help)", unknown)) if items]
    assert not problems, "the Scripts table in docs/scripts.md is out of date:\n  " + "\n  ".join(problems)


def commands(text: str) -> list[tuple[str, str]]:
    """(script, arguments) of every `python <path>.py ...` the text shows, continuation lines joined; an inline
    command ends at its closing backtick, a shell one at a `#` comment."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for match in re.finditer(r"python\s+([\w./-]+\.py)([^`\n]*)", joined):
        found.append((match.group(1), match.group(2).split(" #", 1)[0]))
    return found


def test_commands_in_the_docs_name_real_scripts_and_flags():
    helps = help_texts()
    wrong = []
    for page in doc_pages():
        for script, arguments in commands(page.read_text()):
            name = f"{page.relative_to(ROOT)}: python {script}"
            if script not in helps:
                wrong.append(f"{name}: no such script")
                continue
            wrong += [f"{name}: {flag} is not in its --help" for flag in FLAG.findall(arguments)
                      if flag != "--help" and not known(flag, set(FLAG.findall(helps[script])))]
    assert not wrong, "commands in the docs that would not run:\n  " + "\n  ".join(wrong)


# -- the checkers themselves ---------------------------------------------------------------------------------------

def test_markdown_helpers():
    text = "# A b\n\n```\n# not a heading\n| x | y |\n```\n\n| path | what |\n| --- | --- |\n| `a|b` | c \\| d |\n"
    assert tables(text) == [(["path", "what"], [["`a|b`", "c | d"]])]
    assert anchors(text + "## Samplers: DDIM and DPM-Solver++(2M)\n## A b\n") == {
        "a-b", "a-b-1", "samplers-ddim-and-dpm-solver2m"}
    assert known("--teacher_<mode>", {"--teacher_low_pass"}) and not known("--teacher_<mode>", {"--student"})
    assert commands("run `python x.py --a 1 \\\n    --b` and\n    python y.py --c  # --d\n") == [
        ("x.py", " --a 1  --b"), ("y.py", " --c ")]
