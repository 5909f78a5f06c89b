"""The package's layers: each private subpackage imports only the layers below it.

    base → wire → observe → runner → backends → pool → asgi → the public modules

Every import counts, wherever it is written: at the top, inside a function, or under
``if TYPE_CHECKING:`` (a type-only back-edge is still a back-edge). Within a layer the
imports form no cycle. Imports inside functions are allowed only where they are not
there to dodge a cycle: the optional backends, loaded on first use, and the fork
server's template, which imports in the child it forks.
"""

from __future__ import annotations

import ast
import pathlib

import flame_asgi

PACKAGE = pathlib.Path(flame_asgi.__file__).parent
LAYERS = ["_base", "_wire", "_observe", "_runner", "backends", "_pool", "_asgi", ""]  # "": the public modules
# (module, imported module): imports inside a function, and why they may be there.
DEFERRED = {
    ("flame_asgi.backends", "flame_asgi.backends.fly"): "optional extra, loaded on first use",
    ("flame_asgi.backends", "flame_asgi.backends.docker"): "optional extra, loaded on first use",
    ("flame_asgi.backends", "flame_asgi.backends.kubernetes"): "optional extra, loaded on first use",
    ("flame_asgi.backends._fork_template", "flame_asgi.backends._serve"): "imported in the forked child",
    ("flame_asgi.backends._fork_template", "flame_asgi"): "preloaded by the fork server",
    ("flame_asgi.backends._fork_template", "flame_asgi._base.parent"): "preloaded by the fork server",
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else LAYERS.index("")


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(module, deferred)`` for every flame_asgi module ``path`` imports."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name.startswith("flame_asgi"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("flame_asgi"):
                assert child.module is not None
                for alias in child.names:  # ``from flame_asgi._observe import telemetry`` imports a module
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in modules else child.module, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_goes_to_its_own_layer_or_one_below() -> None:
    upward = [f"{source} imports {target}" for source, targets in graph().items() for target, _ in targets
              if layer(target) > layer(source) and (source, target) not in DEFERRED]
    assert upward == []


def test_no_import_is_deferred_to_dodge_a_cycle() -> None:
    deferred = [f"{source} imports {target} inside a function" for source, targets in graph().items()
                for target, inner in targets if inner and (source, target) not in DEFERRED]
    assert deferred == []


def test_the_imports_form_no_cycle() -> None:
    edges = {source: {t for t, _ in targets if t != source} for source, targets in graph().items()}
    # Importing a package runs its __init__: the edge to a parent package is implied, not a cycle.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target):], target] if target in trail else [node, target])
            elif target not in state:
                walk(target, [*trail, target])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    # The public package imports everything it re-exports; modules below may import
    # ``flame_asgi`` only where DEFERRED says so, so the top is never part of a cycle.
    assert cycles == []


def test_the_layers_are_the_subpackages() -> None:
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted(name for name in LAYERS if name)
