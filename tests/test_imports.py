"""The import graph of our three packages: no cycle anywhere, and imports go one way only.

Every ``import`` statement counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): a cycle through a lazy or type-only import is still two modules that each need
the other. The layers: ``paged_handler`` -> ``paged`` -> ``paged_kernels``; nothing upward, the
handler imports no torch, and the asyncio side of the engine thread imports no torch at all.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"paged": REPO / "paged", "paged_kernels": REPO / "kernels" / "paged_kernels",
            "paged_handler": REPO / "handler" / "paged_handler"}
# The modules the handler's asyncio loop runs: torch must not be imported by them, even lazily.
ASYNCIO_SIDE = ("paged.async_engine", "paged.engine_thread", "paged.engine_supervisor")


def module_files() -> dict[str, Path]:
    modules = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement of ``module`` names (``from a import b``: ``a.b`` when
    that is a module of ours, else ``a``)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[:len(module.split(".")) - node.level + int(is_package)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return names


def ours(name: str) -> str | None:
    """The module of ours that ``name`` names (or lies in), else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


GRAPH = {module: {target for name in imported_names(module, path) if (target := ours(name)) and target != module}
         for module, path in MODULES.items()}


def package_of(module: str) -> str:
    return module.split(".")[0]


def test_the_walk_sees_every_package_and_known_edges():
    assert {package_of(m) for m in MODULES} == set(PACKAGES)
    assert "paged.scheduler" in GRAPH["paged.engine"] and "paged.engine" in GRAPH["paged_handler.prefixes"]


def test_no_import_cycle():
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
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
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert cycles == [], f"modules that import each other: {cycles}"


@pytest.mark.parametrize("package, forbidden", [
    ("paged", {"paged_handler"}),
    ("paged_kernels", {"paged", "paged_handler"}),
])
def test_imports_go_one_way(package, forbidden):
    upward = sorted((m, t) for m, targets in GRAPH.items() if package_of(m) == package
                    for t in targets if package_of(t) in forbidden)
    assert upward == []


def imports_torch(module: str) -> bool:
    return any(name == "torch" or name.startswith("torch.") for name in imported_names(module, MODULES[module]))


def test_the_handler_imports_no_torch():
    assert [m for m in MODULES if package_of(m) == "paged_handler" and imports_torch(m)] == []


def test_the_asyncio_side_of_the_engine_thread_imports_no_torch():
    assert set(ASYNCIO_SIDE) <= set(MODULES)
    assert [m for m in ASYNCIO_SIDE if imports_torch(m)] == []
