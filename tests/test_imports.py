"""The import graph of ``flora_opt``, read from the source with ``ast`` (nothing is imported): no
cycle between its modules, and no import of the lab (``flora_lab``)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flora_opt"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``), for every module of ``flora_opt``."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(name: str, path: Path, is_package: bool) -> set[str]:
    """Every module name an import statement of the module names, at any depth: an import moved
    into a function hides a cycle from Python until that function runs, not from this graph.
    ``from package import name`` names both ``package`` and ``package.name``."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (each closes on a module on the current path)."""
    state: dict[str, str] = {}
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_no_import_cycle_inside_flora_opt():
    modules = _modules()
    assert "flora_opt.optax.transform" in modules and "flora_opt.core" in modules
    graph = {
        name: (_imported_names(name, path, is_package) & set(modules)) - {name}
        for name, (path, is_package) in modules.items()
    }
    assert _cycles(graph) == []
    # The graph is not empty by accident: the optax chain imports its stages, which import the core.
    assert "flora_opt.optax.transform" in graph["flora_opt.optax.alias"]
    assert "flora_opt.core" in graph["flora_opt.optax.transform"]


def test_a_cycle_is_found():
    """The search itself, on a graph with a cycle closed through a third module."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_flora_opt_never_imports_the_lab():
    """The installed library does not import ``flora_lab`` (docs/architecture.md). ``cli.py`` is
    not checked here: its ``demo`` and ``replicate`` subcommands import the lab inside the
    command."""
    offenders = {}
    for name, (path, is_package) in _modules().items():
        if path.name == "cli.py" and path.parent == PACKAGE:
            continue
        lab = {n for n in _imported_names(name, path, is_package) if n.split(".")[0] == "flora_lab"}
        if lab:
            offenders[name] = sorted(lab)
    assert offenders == {}
