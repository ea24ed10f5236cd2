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


def test_transports_do_not_load_torch() -> None:
    code = "import sys, bridge.transports, bridge.transports.synthetic; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
