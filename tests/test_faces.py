"""The faces only parse, call and print: click lives in the command line package (and options.py, its click
pieces), config.py is model arguments and special ids, and the model knows nothing of processes."""

import ast
from pathlib import Path

import illada_mlx

LIBRARY = Path(illada_mlx.__file__).parent
FACES = {LIBRARY / "cli", LIBRARY / "options.py", LIBRARY / "__main__.py"}
COMMAND_MODULES = ("generate", "chat", "serve", "bench", "eval", "convert")


def imports(path: Path) -> set[str]:
    """Every module `path` imports anywhere (lazy imports too), relative ones resolved to illada_mlx's names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
                continue
            base = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts[: -node.level])
            if node.module:
                names.add(f"{base}.{node.module}")
            else:  # `from . import x`: x is a module
                names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_only_the_faces_import_click():
    library = [f for f in LIBRARY.rglob("*.py") if not FACES & {f, *f.parents}]
    offenders = [str(f.relative_to(LIBRARY)) for f in library if any(m.split(".")[0] == "click" for m in imports(f))]
    assert len(library) > 20 and offenders == []


def test_config_and_quant_are_no_cycle():
    assert "illada_mlx.quant" in imports(LIBRARY / "config.py")
    assert not {m for m in imports(LIBRARY / "quant.py") if m.startswith("illada_mlx.")} - {"illada_mlx.errors"}


def test_the_model_knows_nothing_of_processes():
    assert "illada_mlx.distributed" not in imports(LIBRARY / "model.py")


def test_each_command_is_a_small_module():
    for name in COMMAND_MODULES:
        lines = (LIBRARY / "cli" / f"{name}.py").read_text().count("\n")
        assert lines <= 80, f"cli/{name}.py has {lines} lines"
