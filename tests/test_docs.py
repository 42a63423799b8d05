"""The docs' examples run as written: every ```python block of each page, in order, in one namespace per page
(a page reads top to bottom, so a block may use the names of the blocks before it); ```text blocks are not run.
Links between the pages point at pages that exist."""

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=lambda p: p.name)
def test_examples_run(page):
    namespace = {"__name__": f"docs.{page.stem}"}
    for i, code in enumerate(python_blocks(page.read_text())):
        exec(compile(code, f"{page.name} (python block {i + 1})", "exec"), namespace)


def test_the_pages_exist_and_link_to_each_other():
    assert {p.name for p in PAGES} >= {"math.md", "architecture.md", "api.md"}
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            assert (DOCS / target).is_file(), f"{page.name} links to {target}, which does not exist"


def test_math_equations_are_numbered_once_and_in_order():
    numbers = [int(n) for n in re.findall(r"\s\((\d+)\)$", (DOCS / "math.md").read_text(), flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1))


def command_lines() -> list[tuple[str, list[str]]]:
    """Every `snlp ...` and `torchrun ... -m models.tools.cli ...` line of the docs and the README, in fenced or
    indented blocks, as the words after the command name (placeholders such as DIR or $D kept as words)."""
    import shlex

    found = []
    for page in [*PAGES, DOCS.parent / "README.md"]:
        for line in page.read_text().splitlines():
            command = re.match(r"\s*snlp ", line) or re.match(r"\s*torchrun .*-m models\.tools\.cli ", line)
            words = shlex.split(line.strip(), comments=True) if command else []
            if words and words[0] == "torchrun":
                words = ["snlp", *words[words.index("models.tools.cli") + 1:]]
            if words:
                found.append((f"{page.name}: {line.strip()}", words[1:]))
    return found


@pytest.mark.parametrize("where, argv", command_lines(), ids=[w for w, _ in command_lines()])
def test_every_command_line_parses(where, argv, capsys):
    """Issue 26, row 22: a command line in the docs that the CLI does not take (an unknown flag, a removed
    option) fails here. The lines are parsed by the real parser, not run: the README's training block runs in
    tests/test_readme.py."""
    from models.tools import cli

    try:
        cli._parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}\n{capsys.readouterr().err}")


def shell_programs() -> set[str]:
    """The programs that the shell lines of the docs and the README run: the first word of each line of an
    indented block, or of a ```text block, outside ```python blocks (`jupyter execute` as `jupyter-execute`)."""
    programs = set()
    for page in [*PAGES, DOCS.parent / "README.md"]:
        fence = None
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                fence = None if fence is not None else line[3:]
                continue
            shell = fence == "text" or (fence is None and line.startswith("    "))
            words = line.split()
            if shell and words and words[0] == "jupyter" and len(words) > 1:
                programs.add(f"jupyter-{words[1]}")
            elif shell and words and words[0] in PYTHON_TOOLS:
                programs.add(words[0])
    return programs


# The Python command-line programs a page may tell the user to run (indented blocks also hold maths and prose).
PYTHON_TOOLS = {"snlp", "torchrun", "jupytext", "papermill", "pytest", "pip", "python"}


def test_the_tools_the_docs_run_are_installed():
    """Issue 26, row 23: every Python program a shell line of the docs runs (jupytext, jupyter's subcommands,
    snlp, torchrun, pip, python) is on this environment's PATH: the dev install provides it."""
    import shutil
    import sys

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    programs = shell_programs()
    missing = sorted(p for p in programs if shutil.which(p, path=path) is None)
    assert not missing, f"the docs run programs that the install does not provide: {missing}"
    assert {"snlp", "torchrun", "jupytext", "jupyter-execute"} <= programs  # what the pages do run
