"""The package's shape: commands (``python -m sd_ds.X``) are thin layers over library modules, and no library
module imports a command. Read from the sources (AST), so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "sd_ds"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_command(tree: ast.Module) -> bool:
    """A module with a top-level ``main`` and an ``if __name__ == "__main__":`` block."""
    has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
    runs_main = any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
                    for node in tree.body)
    return has_main and runs_main


def imported_modules(tree: ast.Module, package: str, known: set[str]) -> set[str]:
    """Every module of ``package`` this tree imports, wherever the import statement is (functions and
    ``if TYPE_CHECKING:`` blocks included); ``from pkg import name`` counts ``pkg.name`` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known and name.split(".")[0] == package}


def library_imports_of_commands(root: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """(the command modules, [(library module, command it imports)]) of the package at ``root``."""
    trees = {module_name(p, root): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.py"))}
    # ``pkg/__main__.py`` is what ``python -m pkg`` runs: a command whatever it holds.
    commands = {name for name, tree in trees.items() if is_command(tree) or name.endswith(".__main__")}
    offences = [(name, imported) for name, tree in trees.items() if name not in commands
                for imported in sorted(imported_modules(tree, root.name, set(trees))) if imported in commands]
    return commands, offences


def test_no_library_module_imports_a_command():
    commands, offences = library_imports_of_commands(PACKAGE)
    # The commands the README documents are found as commands (the rule above is not vacuous).
    assert {"sd_ds.train", "sd_ds.init", "sd_ds.encode_latents", "sd_ds.export", "sd_ds.sample", "sd_ds.evaluate",
            "sd_ds.demo", "sd_ds.data.index"} <= commands, commands
    assert not offences, ("library modules import command modules; move what they need into a library module: "
                          f"{offences}")


def test_the_check_sees_a_library_importing_a_command_in_any_form(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def main():\n    pass\n\n\nif __name__ == '__main__':\n    main()\n")
    (pkg / "plain.py").write_text("import os\n")
    (pkg / "direct.py").write_text("from pkg.cli import main\n")
    (pkg / "in_function.py").write_text("def f():\n    import pkg.cli\n")
    (pkg / "as_name.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import cli\n")
    commands, offences = library_imports_of_commands(pkg)
    assert commands == {"pkg.cli"}
    assert sorted(offences) == [("pkg.as_name", "pkg.cli"), ("pkg.direct", "pkg.cli"), ("pkg.in_function", "pkg.cli")]
