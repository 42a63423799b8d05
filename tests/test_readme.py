"""The README's examples run as written: every ```python block, in order, in one namespace; the command lines of
its training block, in order, in one directory; every other fenced block is ```text and is not run. Its links point
at files that exist."""

import json
import os
import re
import shlex
import subprocess
import sys
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


def test_training_commands_run_as_written(tmp_path):
    """The block of `snlp train` lines, each a command a user copies: run in order in one fresh directory (the
    console script as `python -m models.tools.cli`, torchrun as `python -m torch.distributed.run`)."""
    block = next(b for b in re.findall(r"^```text\n(.*?)^```", README, flags=re.S | re.M) if "snlp train" in b)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [c[0] for c in commands].count("torchrun") == 2 and len(commands) >= 8
    env = {**os.environ, "SNLP_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    prefix = {"snlp": [sys.executable, "-m", "models.tools.cli"],
              "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    for words in commands:
        done = subprocess.run(prefix[words[0]] + words[1:], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{shlex.join(words)}\n{done.stderr[-3000:]}"
        if words[0] == "torchrun" and "train" in words:  # rank 0 alone speaks for a data-parallel run
            assert done.stdout.count("validation loss") == 1, done.stdout
        if words[0] == "torchrun" and "--stages" in words:  # rank 0 alone prints the text
            assert done.stdout.count("ROMEO.") == 1, done.stdout
    assert json.loads((tmp_path / "runs" / "idn" / "metrics.json").read_text())["train"][-1]["step"] == 39
    assert (tmp_path / "runs" / "idn" / "study" / "report.md").exists()
