"""The package's layout, read from the code's own import statements: imports point downward.

The library rooms are ordered errors < cache < extract < train < evaluate: a module imports only
rooms at or below its own. The command line (pipeline.py, cli/, every ``cli.py``, and the two
evaluate modules that exist for commands: the demo and the workspace's defaults) sits on top: the
library never imports it, and nothing but the command line imports click.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_ORDER = ("errors", "cache", "extract", "train", "evaluate")
COMMAND_MODULES = {"raml.pipeline", "raml.evaluate.demo", "raml.evaluate.workspace"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["raml", *parts])


def package_modules() -> dict[str, Path]:
    rooms = ("cache", "cli", "extract", "train", "evaluate")
    found = {module_name(ROOT / name): ROOT / name for name in ("pipeline.py", "errors.py")}
    for room in rooms:
        found.update({module_name(path): path for path in (ROOT / room).rglob("*.py")})
    return found


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports; with ``top_level_only``, those imported when it is imported (not
    inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def is_command_line(module: str) -> bool:
    parts = module.split(".")
    return module in COMMAND_MODULES or parts[1] == "cli" or parts[-1].endswith("cli")


def room(module: str) -> str:
    return module.split(".")[1]


MODULES = package_modules()


def test_the_package_has_every_room():
    assert {room(module) for module in MODULES} == {
        "pipeline",
        "errors",
        "cache",
        "cli",
        "extract",
        "train",
        "evaluate",
    }
    assert len(MODULES) > 60


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not is_command_line(m)))
def test_the_library_imports_downward_and_never_the_command_line(module):
    level = LIBRARY_ORDER.index(room(module))
    for name in imports(MODULES[module]):
        assert name.split(".")[0] != "click", f"{module} imports click: only the command line may"
        if name.startswith("raml."):
            target = name if name in MODULES else name.rsplit(".", 1)[0]
            assert not is_command_line(target), f"{module} imports the command line's {target}"
            assert LIBRARY_ORDER.index(room(target)) <= level, f"{module} imports {target}, a room above its own"


def test_no_module_imports_pipeline():
    for module, path in MODULES.items():
        assert not any(name.startswith("raml.pipeline") for name in imports(path)), module


def test_no_import_cycle():
    graph = {
        module: {name for name in imports(path, top_level_only=True) if name in MODULES and name != module}
        for module, path in MODULES.items()
    }
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            cycle = on_path[on_path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        on_path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_module_over_400_lines():
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
