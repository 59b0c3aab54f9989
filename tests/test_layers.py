"""
The package layout keeps its shape: every import inside C{mydataproxy}
(module level, in functions and under C{TYPE_CHECKING} alike) points down
the layers, and no module imports itself back through others.

The layer order is written here once; lower layers come first, and a module
may import its own package's modules or those of any lower layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mydataproxy

LAYERS = (
    ("mydataproxy.sockets",),
    ("mydataproxy.http",),
    ("mydataproxy.config",),
    ("mydataproxy.egress",),
    ("mydataproxy.tls",),
    ("mydataproxy.upstream",),
    ("mydataproxy.ops",),
    ("mydataproxy.material",),
    ("mydataproxy.pipeline",),
    ("mydataproxy.server",),
    ("mydataproxy.forward", "mydataproxy.reverse"),
    ("mydataproxy.generation",),
    ("mydataproxy.service", "mydataproxy.cli"),
    ("mydataproxy.workers",),
)

ROOT = Path(mydataproxy.__file__).resolve().parent


def moduleName(path: Path) -> str:
    parts = ("mydataproxy", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def importsOf(path: Path) -> set[str]:
    """Every C{mydataproxy} module C{path} imports, wherever the import stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mydataproxy."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mydataproxy"):
            if node.module == "mydataproxy":
                found.update(f"mydataproxy.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


GRAPH = {moduleName(path): importsOf(path) for path in ROOT.rglob("*.py")}


def layerOf(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def packageOf(module: str) -> str:
    return module if module in GRAPH and (ROOT / Path(*module.split(".")[1:]) / "__init__.py").exists() else module.rpartition(".")[0]


def test_everyModuleHasALayer() -> None:
    for module in GRAPH:
        if module != "mydataproxy":
            layerOf(module)


def test_importsPointDownTheLayers() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module != "mydataproxy"
        for target in targets
        if layerOf(target) > layerOf(module)
        or (layerOf(target) == layerOf(module) and packageOf(target).split(".")[:2] != module.split(".")[:2])
    ]
    assert not upward, "imports that point up (or sideways) the layers:\n" + "\n".join(sorted(upward))


def test_noImportCycle() -> None:
    def resolve(name: str) -> str:
        # "from mydataproxy.config import X" imports the package's __init__.
        return name if name in GRAPH else name.rpartition(".")[0]

    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            target = resolve(target)
            if target == module or target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_theCheckSeesEveryKindOfImport(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import mydataproxy.a\n"
        "from mydataproxy.b import x\n"
        "from mydataproxy import c\n"
        "def f():\n    from mydataproxy.d import y\n"
        "if TYPE_CHECKING:\n    from mydataproxy.e import z\n"
    )
    assert importsOf(source) == {f"mydataproxy.{n}" for n in "abcde"}
