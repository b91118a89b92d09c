"""The package's import graph, read from the source: layers only look down, and no module cycle exists.

Layers, bottom to top: `catalog/` and `tasks/`, then `pipelines/` (which composes the stages' settings),
then `flows/`, then `deploy/`. Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("catalog", "tasks", "pipelines", "flows", "deploy")
# What each layer may import from the project (its own package included).
ALLOWED = {
    "catalog": {"catalog", "tasks.errors"},
    "tasks": {"tasks", "catalog"},
    "pipelines": {"pipelines", "tasks", "catalog"},
    "flows": {"flows", "pipelines", "tasks", "catalog"},
    "deploy": {"deploy", "flows", "pipelines", "tasks", "catalog"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports (absolute and relative, at any depth of the code)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "templates" not in p.parts]
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        # `from pkg import name` names a module or an attribute: keep the longest module it resolves to.
        targets = {t if t in modules else t.rpartition(".")[0] for t in project_imports(path)}
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def upward_arrows(edges: dict[str, set[str]]) -> set[str]:
    upward = set()
    for source, targets in edges.items():
        allowed = ALLOWED[source.split(".")[0]]
        upward |= {f"{source} -> {t}" for t in targets if not any(t == a or t.startswith(a + ".") for a in allowed)}
    return upward


def test_no_layer_imports_a_higher_one():
    assert upward_arrows(graph()) == set()


# Inside tasks/: the stages (each reads its own spec section and wires libraries together) sit above the
# libraries they use, which never import a stage.
STAGES = {"tasks.load", "tasks.calibrate", "tasks.search_stage", "tasks.prune", "tasks.recover_stage",
          "tasks.evaluate", "tasks.speed_stage", "tasks.distributed.runner"}
LIBRARIES = ("tasks.search", "tasks.score", "tasks.surgery", "tasks.recover", "tasks.export", "tasks.sources",
             "tasks.residual", "tasks.windows", "tasks.registry", "tasks.settings", "tasks.errors")


def test_libraries_never_import_a_stage():
    edges = graph()
    assert STAGES <= set(edges)  # the names above still exist
    into_stages = {f"{source} -> {target}" for source, targets in edges.items() for target in targets & STAGES
                   if source.startswith(LIBRARIES) and source not in STAGES}
    assert into_stages == set()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exports its modules: an arrow into a package's module through its
    # __init__ is not a cycle of the modules themselves, so __init__ files are left out of the check.
    init_free = {m for m in edges if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    return {m: {t for t in ts if t not in init_free} for m, ts in edges.items() if m not in init_free}


def test_no_module_cycles():
    assert _cycles(_package_edges(graph())) == []


def test_the_checks_see_arrows_and_cycles():
    # The checks themselves can fail: a known upward arrow and a two-module cycle are reported.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert upward_arrows({"tasks.x": {"flows.cli", "tasks.y"}, "flows.cli": {"tasks.x"}}) == {"tasks.x -> flows.cli"}
    edges = graph()
    assert "tasks.surgery.kv_cache" in edges["tasks.surgery.removed"]  # absolute imports
    assert "tasks.surgery.architecture" in edges["tasks.surgery"]  # relative and package imports
