"""The layering rules of DESIGN.md, checked on the real package: the asyncio side never imports torch,
and model code never imports asyncio."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import moss_agent

PACKAGE = Path(moss_agent.__file__).parent


def _modules(subpackage: str) -> list[str]:
    root = PACKAGE / subpackage
    return [f"moss_agent.{subpackage}.{m.name}" for m in pkgutil.iter_modules([str(root)])]


def test_streaming_and_transports_do_not_pull_in_torch() -> None:
    modules = ["moss_agent", "moss_agent.events", *_modules("streaming"), *_modules("transports")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"torch was imported by one of {modules}"


def test_models_never_import_asyncio() -> None:
    offenders = []
    for path in (PACKAGE / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "asyncio" or n.startswith("asyncio.") for n in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, f"models/ must not import asyncio: {offenders}"
