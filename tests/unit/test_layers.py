"""The package's import graph: no cycles, and no layer imports a higher one.

Every ``import`` counts, at module level or inside a function, under ``TYPE_CHECKING``
or not: a cycle that only appears at run time is still a cycle.  The layers are the
ones drawn in ``asynckarton/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "asynckarton"

#: Lowest first: a module may import its own layer (without a cycle) or a lower one.
LAYERS: list[tuple[str, ...]] = [
    ("asynckarton._errors", "asynckarton._version"),
    ("asynckarton._settings",),
    ("asynckarton.storage",),
    ("asynckarton._wire",),
    ("asynckarton.backend",),
    ("asynckarton._services",),
    ("asynckarton.system",),
    ("asynckarton.demo",),
    ("asynckarton.cli", "asynckarton.fastapi", "asynckarton.testing"),
    ("asynckarton", "asynckarton.__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (a package import counts as its ``__init__``).

    Parent packages that Python runs on the way to a submodule are not counted: they are
    imported by any import of the submodule, so they are no edge of their own.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the module; ``from mod import name`` the module.
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in known] or [module]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(name: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or name.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_every_module_has_a_layer() -> None:
    """A new top-level module or subpackage must be placed in the layer map."""
    unplaced = [name for name in _modules() if _layer(name) < 0]
    assert unplaced == []


def test_no_import_cycle() -> None:
    """No chain of imports, including ones inside functions, leads back to its start."""
    assert _cycle(_graph()) is None


def test_no_layer_imports_a_higher_one() -> None:
    """Lower layers never import higher ones (edges -> system -> services -> ...)."""
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(name)
    )
    assert upward == []


def test_the_checker_finds_cycles_and_upward_imports() -> None:
    """The checks above can fail: a cycle and an upward edge are reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("asynckarton.backend._redis") > _layer("asynckarton._wire._task")


@pytest.mark.parametrize("name", ["asynckarton._services._run", "asynckarton.cli._app"])
def test_relative_imports_resolve(name: str) -> None:
    """The resolver sees the run loop below the CLI, the way Python resolves it."""
    graph = _graph()
    assert "asynckarton._services._run" in graph["asynckarton.cli._app"]
    assert name in graph
