"""The import directions of DESIGN.md: the engine imports no other part; transports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

BRIDGE = Path(__file__).resolve().parents[1] / "bridge"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_imports_no_transports_control_or_runtime() -> None:
    for path in (BRIDGE / "engine").glob("*.py"):
        for name in imported_modules(path):
            assert not name.startswith(
                ("bridge.transports", "bridge.control", "bridge.runtime", "bridge.cli")
            ), f"{path.name} imports {name}"


def test_control_transports_params_and_config_do_not_load_torch() -> None:
    modules = ["bridge.params", "bridge.config", "bridge.frames", "bridge.control"]
    modules += [f"bridge.control.{p.stem}" for p in (BRIDGE / "control").glob("*.py") if p.stem != "__init__"]
    modules += ["bridge.transports"]
    modules += [
        f"bridge.transports.{p.stem}" for p in (BRIDGE / "transports").glob("*.py") if p.stem != "__init__"
    ]
    vendors = ["torch", "cyndilib", "SpoutGL", "syphon", "pyvirtualcam", "cv2"]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        f"print([v for v in {vendors!r} if v in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # no torch, and every optional medium's library stays unloaded


def test_control_and_transports_import_no_engine_or_runtime() -> None:
    for part in ("control", "transports"):
        for path in (BRIDGE / part).glob("*.py"):
            for name in imported_modules(path):
                assert not name.startswith(("bridge.engine", "bridge.runtime", "bridge.cli", "torch")), (
                    f"{part}/{path.name} imports {name}"
                )


def _module_name(path: Path) -> str:
    parts = path.relative_to(BRIDGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """bridge module -> the bridge modules it imports, anywhere in its text: at the top, inside
    functions (lazy) and under TYPE_CHECKING alike, since each of those is a dependency."""
    modules = {_module_name(p): p for p in BRIDGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for target in sorted(graph[node]):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return []


def test_the_bridge_has_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle == [], "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
