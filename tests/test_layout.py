"""Each package keeps to its job: the imports DESIGN.md forbids never appear, and bot/ has no import circle."""

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


FRONT_END_FREE = ("bot/pipeline", "bot/images")
"""What every front end shares: no Discord, neither the library nor the bot's Discord front end."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(path: Path) -> set[str]:
    """Full names of the modules `path` imports when it is loaded: not under `if TYPE_CHECKING:`, not in a
    function or class body. `from a.b import c` counts as `a.b.c` when that is a module of this project."""
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    is_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                        ROOT / candidate.replace(".", "/") / "__init__.py").exists()
                    names.add(candidate if is_module else node.module)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports) as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return [*path[path.index(target):], target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def bot_import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in (ROOT / "bot").rglob("*.py")}
    return {name: {m for m in module_level_imports(path) if m in modules} for name, path in modules.items()}


@pytest.mark.parametrize("folder", FRONT_END_FREE)
def test_shared_pipeline_and_images_import_no_discord(folder: str):
    offenders = {}
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        bad = sorted(m for m in imported if m.split(".")[0] == "discord" or m.startswith("bot.discord_app"))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_no_import_circle_in_bot():
    graph = bot_import_graph()
    assert "bot.discord_app.client" in graph and "bot.pipeline.conversation" in graph["bot.discord_app.client"] | {
        m for dep in graph["bot.discord_app.client"] for m in graph[dep]}
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_under_type_checking_or_in_functions_do_not_count(tmp_path: Path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import json\n"
        "if TYPE_CHECKING:\n    import bot.discord_app.client\n"
        "def f():\n    import bot.settings\n"
        "try:\n    import bot.errors\nexcept ImportError:\n    pass\n"
    )
    assert module_level_imports(source) == {"typing", "json", "bot.errors"}


def test_fixed_points_exist():
    for name in ("pyproject.toml", "README.md", "Makefile", ".ci/run", "bot", "model_server", "storage", "tests",
                 "deploy", "bench"):
        assert (ROOT / name).exists(), name


def test_the_bot_and_the_remote_backends_run_without_loading_torch():
    """torch stops at the edge of the in-process model: the bot's modules, the TGI and the OpenAI-compatible
    backends never load it."""
    import subprocess
    import sys

    code = ("import sys, bot.discord_app.app, bot.discord_app.cogs.tasks, bot.discord_app.cogs.channel, "
            "bot.pipeline.conversation, model_server.executor, model_server.tgi, model_server.openai; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


CONCRETE_BACKENDS = ("model_server.executor", "model_server.tgi", "model_server.openai", "model_server.remote",
                     "model_server.replicas", "model_server.engine")
BACKEND_OPENER = "bot/pipeline/services.py"
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
