"""The library never imports the converter: `illada_mlx_convert` depends on `illada_mlx`, not the reverse.
Only the composition root (the command line) may bring the two together."""

import ast
from pathlib import Path

import illada_mlx

LIBRARY = Path(illada_mlx.__file__).parent
COMPOSITION_ROOT = {"cli.py", "__main__.py"}


def imported_modules(tree: ast.AST) -> set[str]:
    """Every absolute module name an import statement in `tree` names (anywhere, lazy imports included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_oracle_sees_lazy_imports():
    tree = ast.parse("def f():\n    from illada_mlx_convert.converter import convert\n    import illada_mlx_convert\n")
    assert imported_modules(tree) == {"illada_mlx_convert.converter", "illada_mlx_convert"}


def test_library_modules_do_not_import_the_converter():
    files = [f for f in sorted(LIBRARY.rglob("*.py")) if f.name not in COMPOSITION_ROOT or f.parent != LIBRARY]
    assert len(files) > 10
    offenders = [str(f.relative_to(LIBRARY)) for f in files
                 if any(m.split(".")[0] == "illada_mlx_convert" for m in imported_modules(ast.parse(f.read_text())))]
    assert offenders == []
