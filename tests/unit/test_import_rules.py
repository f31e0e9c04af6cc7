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


def test_the_public_api_resolves_and_the_package_import_stays_light() -> None:
    """Every name in moss_agent.__all__ imports; ``import moss_agent`` alone loads no torch."""
    code = (
        "import sys, moss_agent, moss_agent.options, moss_agent.model_ids\n"
        "light = 'torch' not in sys.modules\n"
        "missing = [name for name in moss_agent.__all__ if getattr(moss_agent, name, None) is None]\n"
        "print(light, missing)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True []", out.stdout + out.stderr


def test_examples_use_only_the_public_api() -> None:
    """Examples import from ``moss_agent`` itself, its documented ``options``/``testing`` modules and
    framework adapters, or the standard library and third-party packages; never from the CLI's
    internals or deep modules."""
    public = {
        "moss_agent",
        "moss_agent.options",
        "moss_agent.testing",
        "moss_agent.integrations.pipecat",
        "moss_agent.integrations.livekit",
    }
    offenders = []
    for path in sorted((PACKAGE.parent / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            offenders += [f"{path.name}: {m}" for m in modules if m.startswith("moss_agent") and m not in public]
    assert not offenders, f"examples import non-public modules: {offenders}"
