"""The library never imports the converter: `illada_mlx_convert` depends on `illada_mlx`, not the reverse.
Only the composition root (the command line) may bring the two together."""

import ast
from pathlib import Path

import illada_mlx

LIBRARY = Path(illada_mlx.__file__).parent
COMPOSITION_ROOT = {LIBRARY / "cli", LIBRARY / "__main__.py"}  # the command line package, `python -m`


def imported_modules(tree: ast.AST) -> set[str]:
    """Every absolute module name `tree` imports anywhere (lazy imports included): import statements, and
    string literals given to `import_module(...)` / `__import__(...)`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            names.update(a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def test_the_oracle_sees_lazy_and_dynamic_imports():
    source = """
def f():
    from illada_mlx_convert.converter import convert
    import illada_mlx_convert
    importlib.import_module('illada_mlx_convert.demo')
    __import__('illada_mlx_convert.cli')
    from .load import load
    'illada_mlx_convert is only named in this string'
"""
    tree = ast.parse(source)
    assert imported_modules(tree) == {
        "illada_mlx_convert.converter",
        "illada_mlx_convert",
        "illada_mlx_convert.demo",
        "illada_mlx_convert.cli",
    }


def test_library_modules_do_not_import_the_converter():
    files = [f for f in sorted(LIBRARY.rglob("*.py")) if not COMPOSITION_ROOT & {f, *f.parents}]
    assert len(files) > 10
    offenders = [
        str(f.relative_to(LIBRARY))
        for f in files
        if any(m.split(".")[0] == "illada_mlx_convert" for m in imported_modules(ast.parse(f.read_text())))
    ]
    assert offenders == []


def test_neither_the_library_nor_the_converter_imports_training():
    # training/ (the demo model's trainer and yardstick) is a lab: the runtime never depends on it
    converter = Path(illada_mlx.__file__).parents[1] / "convert"
    files = sorted(LIBRARY.rglob("*.py")) + sorted(converter.rglob("*.py"))
    offenders = [
        f.name for f in files if any(m.split(".")[0] == "training" for m in imported_modules(ast.parse(f.read_text())))
    ]
    assert len(files) > 10 and offenders == []


# ------------------------------------------------------------------------------------------ private names
OWN = ("illada_mlx", "illada_mlx_convert")


def _own(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] in OWN


def private_crossings(tree: ast.AST) -> list[str]:
    """Every `_name` (not a dunder) a module takes from another of the project's modules: `from .x import
    _name`, `from . import _x`, or `x._name` where x was imported from the project."""
    private = lambda n: n.startswith("_") and not (n.startswith("__") and n.endswith("__"))  # noqa: E731
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _own(node):
            for a in node.names:
                if private(a.name):
                    found.append(f"from {'.' * node.level}{node.module or ''} import {a.name}")
                imported.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in OWN)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in imported:
                found.append(f"{ast.unparse(node.value)}.{node.attr}")
    return found


def test_the_private_name_oracle_sees_each_form():
    source = """
import os
from .decode import _forward, Step
from . import batch as B, _hidden
import illada_mlx.decode
from illada_mlx.cache import BlockCache
x = B._row(1) + illada_mlx.decode._denoise_block + Step._secret + BlockCache.__name__
os._exit(1)
self._ok = other._fine
"""
    assert sorted(private_crossings(ast.parse(source))) == sorted(
        [
            "from .decode import _forward",
            "from . import _hidden",
            "B._row",
            "illada_mlx.decode._denoise_block",
            "Step._secret",
        ]
    )


def test_no_module_takes_another_modules_private_names():
    converter = Path(illada_mlx.__file__).parents[1] / "convert"
    files = sorted(LIBRARY.rglob("*.py")) + sorted(converter.rglob("*.py"))
    found = {
        (str(f.relative_to(f.parents[1] if f.is_relative_to(converter) else LIBRARY.parent)), what)
        for f in files
        for what in private_crossings(ast.parse(f.read_text()))
    }
    assert len(files) > 10
    assert sorted(found) == []
