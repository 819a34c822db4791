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


MAX_LINES, MAX_PARAMETERS = 60, 8  # issue 34's size rule: a function's def line to its last, named parameters
OFFICIAL_SIGNATURES = {("decode.py", "generate"), ("decode.py", "var_generate")}  # the official LLaDA functions'


def _is_click_command(fn: ast.AST) -> bool:
    """Decorated with click.command / click.group (or a click group's .command / .group)."""
    for d in fn.decorator_list:
        f = d.func if isinstance(d, ast.Call) else d
        if isinstance(f, ast.Attribute) and f.attr in ("command", "group"):
            return True
    return False


def _parameters(fn: ast.AST, in_class: bool) -> int:
    """Named parameters (positional-only, positional, keyword-only), a method's self / cls not counted."""
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    return len(names) - (in_class and bool(names) and names[0] in ("self", "cls"))


def oversized(tree: ast.AST, where: str = "") -> list[str]:
    """'where:qualname (N lines, M parameters)' for every function of `tree` over the size rule, click
    commands and OFFICIAL_SIGNATURES excepted; nested functions and methods included."""
    found = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lines, params = child.end_lineno - child.lineno + 1, _parameters(child, in_class)
                excepted = _is_click_command(child) or (where, name) in OFFICIAL_SIGNATURES
                if (lines > MAX_LINES or params > MAX_PARAMETERS) and not excepted:
                    found.append(f"{where}:{name} ({lines} lines, {params} parameters)")
                visit(child, f"{name}.", False)
            else:
                visit(child, prefix, in_class)

    visit(tree, "", False)
    return found


def test_the_size_oracle_sees_long_and_wide_functions_and_its_exceptions():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    source = f"""
def long():
{body}

def fine(a, b, c, d, e, f, g, h, *args, **kw):
    pass

def wide(a, b, c, d, e, f, g, h, *, i):
    pass

class C:
    def method(self, a, b, c, d, e, f, g, h):
        pass

    def wide_method(self, a, b, c, d, e, f, g, h, i):
        def inner(a, b, c, d, e, f, g, h, i):
            pass

@click.command("x")
@click.option("--a")
def command(a, b, c, d, e, f, g, h, i):
{body}

def generate(a, b, c, d, e, f, g, h, i):
    pass
"""
    found = oversized(ast.parse(source), "decode.py")
    assert found == [
        "decode.py:long (61 lines, 0 parameters)",
        "decode.py:wide (2 lines, 9 parameters)",
        "decode.py:C.wide_method (3 lines, 9 parameters)",
        "decode.py:C.wide_method.inner (2 lines, 9 parameters)",
    ]
    assert "other.py:generate (2 lines, 9 parameters)" in oversized(ast.parse(source), "other.py")


def test_no_function_is_over_the_size_rule():
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        found += oversized(ast.parse(path.read_text()), path.relative_to(LIBRARY).as_posix())
    assert not found, found
