"""Data flows one way (STYLE.md, Layout): data -> model -> step; eval reads data and model; telemetry
imports nothing upstream; engine composes; only cli imports engine. Read from the source, so a wrong
import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"fastbyol.config", "fastbyol.errors", "fastbyol.files", "fastbyol.kernels"}
ALLOWED = {
    "data": BASE | {"fastbyol.data"},
    "model": BASE | {"fastbyol.data", "fastbyol.model"},
    "step": BASE | {"fastbyol.data", "fastbyol.model", "fastbyol.step"},
    "telemetry": {"fastbyol.telemetry", "fastbyol.errors", "fastbyol.files"},
    "eval": BASE | {"fastbyol.data", "fastbyol.model", "fastbyol.eval"},
    "engine": BASE | {"fastbyol.data", "fastbyol.model", "fastbyol.step", "fastbyol.telemetry", "fastbyol.eval",
                      "fastbyol.engine"},
}


def _fastbyol_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastbyol"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastbyol")}
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_imports_follow_the_layers() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / "fastbyol" / layer).glob("*.py")):
            for module in _fastbyol_imports(path):
                if _layer(module) not in allowed:
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, bad


def test_only_cli_imports_engine() -> None:
    importers = [p.name for p in (ROOT / "fastbyol").glob("*.py")
                 if any(_layer(m) == "fastbyol.engine" for m in _fastbyol_imports(p))]
    assert importers == ["cli.py"]
    assert not any(_layer(m) == "fastbyol.engine" for m in _fastbyol_imports(ROOT / "fastbyol" / "config.py"))
