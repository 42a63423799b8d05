"""The README's example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    sol = namespace["sol"]
    assert sol.trace.shape == (33, 8, 64) and sol.result.ok
