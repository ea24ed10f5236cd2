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
