"""The docs' examples run as written: every ```python block of each page, in order, in one namespace per page
(a page reads top to bottom, so a block may use the names of the blocks before it); ```text blocks are not run.
Links between the pages point at pages that exist."""

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
