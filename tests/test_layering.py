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
