"""Packaging: `import flora_opt` needs neither framework; each side names its extra when missing."""

import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def __init__(self, names): self.names = names
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ImportError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Block(set(sys.argv[1].split(","))))
    """
)


def _run(blocked, body):
    code = BLOCKER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, blocked], capture_output=True, text=True, timeout=120)


def test_import_without_torch_and_the_torch_names_say_which_extra():
    result = _run(
        "torch,accelerate",
        """
        import flora_opt
        assert flora_opt.__version__
        try:
            flora_opt.Flora
        except ImportError as error:
            assert "pip install 'flora-opt[torch]'" in str(error), error
            print("OK")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_import_without_jax_and_the_jax_names_say_which_extra():
    result = _run(
        "jax,jaxlib,optax",
        """
        import flora_opt
        try:
            flora_opt.optax_flora
        except ImportError as error:
            assert "pip install 'flora-opt[jax]'" in str(error), error
            print("OK")
        import torch
        flora_opt.Flora([torch.nn.Parameter(torch.zeros(2, 2))], lr=1e-3)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_public_names():
    pytest.importorskip("torch")
    import flora_opt
    from flora_opt.optim import Flora

    assert flora_opt.Flora is Flora
    assert "Flora" in dir(flora_opt)
    with pytest.raises(AttributeError):
        flora_opt.NotAThing  # noqa: B018


def test_from_flora_opt_optax_import_without_jax_names_the_extra():
    result = _run(
        "jax,jaxlib,optax",
        """
        try:
            from flora_opt.optax import flora
        except ImportError as error:
            assert "pip install 'flora-opt[jax]'" in str(error), error
            print("OK")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_library_does_not_import_the_lab():
    """flora_opt never imports flora_lab, except the `demo` subcommand of cli.py (lazily)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flora_opt"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name.split(".")[0] == "flora_lab" for name in names) and path.name != "cli.py":
                offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders
