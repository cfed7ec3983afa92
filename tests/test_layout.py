"""Each package keeps to its job: the imports DESIGN.md forbids never appear."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "storage": {"discord", "torch", "transformers", "bot", "model_server"},
    "model_server": {"discord", "bot", "storage"},
    "bot": {"torch", "transformers"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports(package: str):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_fixed_points_exist():
    for name in ("pyproject.toml", "README.md", "Makefile", ".ci/run", "bot", "model_server", "storage", "tests",
                 "deploy", "bench"):
        assert (ROOT / name).exists(), name


def test_the_bot_and_the_tgi_backend_run_without_loading_torch():
    """torch stops at the edge of the in-process model: the bot's modules and the TGI backend never load it."""
    import subprocess
    import sys

    code = ("import sys, bot.app, bot.commands, bot.conversation, model_server.executor, model_server.tgi; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


CONCRETE_BACKENDS = ("model_server.executor", "model_server.tgi", "model_server.replicas", "model_server.engine")
BACKEND_OPENER = "bot/runtime.py"
"""The one front-end module that opens backends, and so names them."""


def full_imports(path: Path) -> set[str]:
    """Every module `path` imports, by its full dotted name (at any depth: lazy imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_front_ends_know_only_the_backend_contract():
    """Front ends are typed against `model_server.backend`; only the module that opens backends names one."""
    offenders = {}
    for path in sorted((ROOT / "bot").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative == BACKEND_OPENER:
            continue
        concrete = sorted(name for name in full_imports(path)
                          if any(name == c or name.startswith(c + ".") for c in CONCRETE_BACKENDS))
        if concrete:
            offenders[relative] = concrete
    assert offenders == {}


def test_the_layering_check_sees_a_concrete_import(tmp_path: Path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from model_server.tgi import TgiExecutor\n    from model_server import replicas\n")
    assert {"model_server.tgi", "model_server.replicas"} <= full_imports(sample)
