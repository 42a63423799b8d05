"""The house rules of the import graph: no cycles among the project's modules, and dependencies that point one way
(layersolve <- models.nanochat <- models.hf <- models.inference <- models.training <- models.tools; analysis never imports
models; only models.tools imports analysis). Every import counts, including those inside functions and under
TYPE_CHECKING, because each one is a dependency a reader must follow."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("layersolve", "models", "analysis")


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules that module `name` imports (a package's __init__ counts as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name` names a module or an attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges = {name: imports(name, path, known) for name, path in mods.items()}
    for name in mods:  # a package imports nothing on behalf of its children: drop child -> ancestor edges
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    return edges


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


LAYERS = ["layersolve", "models.io", "models.nanochat", "models.hf", "models.inference", "models.training",
          "models.tools"]


def layer(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def test_dependencies_point_one_way():
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            if source.startswith("analysis") and target.startswith("models"):
                wrong.append(f"{source} -> {target} (analysis reads what models writes, never imports it)")
            elif target.startswith("analysis") and not source.startswith(("models.tools", "analysis")):
                wrong.append(f"{source} -> {target} (only models.tools may import analysis)")
            elif target.startswith("models") and source.startswith("layersolve"):
                wrong.append(f"{source} -> {target} (layersolve knows nothing of models)")
            elif layer(source) is not None and layer(target) is not None and layer(target) > layer(source):
                wrong.append(f"{source} -> {target} (imports run down {' <- '.join(LAYERS)})")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("name", sorted(n for n, p in modules().items() if p.name == "__init__.py"))
def test_every_package_says_what_it_is_for(name):
    doc = importlib.import_module(name).__doc__
    assert doc and len(doc.split()) >= 8, f"{name} needs a docstring that says what it is for"


def test_the_walk_sees_the_edges_it_must():
    """The graph is not vacuous: known edges are found (a broken walker would pass the tests above)."""
    edges = graph()
    assert "models.nanochat.gpt" in edges["models.inference.snlp"]
    assert "layersolve" in edges["models.nanochat.system"]
    assert "analysis" in edges["models.tools.demo"]
    assert "models.training.tokenizer" in edges["models.training.data"]


def test_only_the_adapter_imports_transformers():
    """transformers is an optional extra ([hf]): only models.hf imports it, and only inside the functions that load."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "transformers" or n.startswith("transformers.") for n in names):
                found.append(name)
    assert found and set(found) <= {"models.hf.load"}, sorted(set(found))
