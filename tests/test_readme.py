"""The README's examples run as written: every ```python block, in order, in one namespace; every other fenced block
is ```text and is not run. Its links point at files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_every_fenced_block_is_python_or_text():
    languages = re.findall(r"^```(\w*)\n.*?^```", README, flags=re.S | re.M)
    assert languages and set(languages) <= {"python", "text"}, languages


def test_python_examples_run():
    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    assert len(blocks) == 2
    namespace = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md (python block {i + 1})", "exec"), namespace)
    sol = namespace["sol"]
    assert sol.trace.shape == (33, 8, 64) and sol.result.ok
    out = namespace["out"]
    assert out.result.ok and out.logits.shape == (1, 32, 256) and namespace["tokens"].shape == (1, 16)


def test_links_point_at_files():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert "docs/math.md" in links
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
