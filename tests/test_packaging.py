"""Packaging: the distribution's metadata, `import flora_opt` needs neither framework, each side
names its extra when missing (and every extra a message names exists), the library never imports
the lab, and third-party loaders print nothing on import or at the demo's start."""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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
    return subprocess.run([sys.executable, "-c", code, blocked], capture_output=True, text=True, timeout=300)


def test_import_without_torch_and_the_torch_names_say_which_extra():
    result = _run(
        "torch,accelerate",
        """
        import flora_opt
        assert flora_opt.__version__
        try:
            flora_opt.Flora
        except ImportError as error:
            assert "pip install 'flora-optim[torch]'" in str(error), error
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
            assert "pip install 'flora-optim[jax]'" in str(error), error
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
            assert "pip install 'flora-optim[jax]'" in str(error), error
            print("OK")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_library_does_not_import_the_lab():
    """No module of flora_opt (cli.py included) imports flora_lab, at any level of the file."""
    offenders = []
    for path in sorted((REPO / "flora_opt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "flora_lab" for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


# ---- metadata --------------------------------------------------------------------------------


def _pyproject(path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / path / "pyproject.toml").read_text())


def _extras(pyproject) -> set[str]:
    return set(pyproject["project"].get("optional-dependencies", {}))


def _requirement(text):
    """``(name, extras, specifier)`` of a requirement string such as ``flora-optim[torch]>=0.1``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)", text)
    name, extras, specifier = match.groups()
    return name.lower(), {e.strip() for e in (extras or "").split(",") if e.strip()}, specifier.strip()


def test_metadata_names_license_and_scripts():
    library, lab = _pyproject("."), _pyproject("lab")
    # `flora-opt` on PyPI is another project (the paper's reference code): ours is flora-optim
    assert library["project"]["name"] == "flora-optim"
    assert lab["project"]["name"] == "flora-lab"
    for path, pyproject in ((".", library), ("lab", lab)):
        project = pyproject["project"]
        assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639), not a table
        for name in project["license-files"]:
            assert (REPO / path / name).read_text().startswith("\n                                 Apache License")
        assert not any(c.startswith("License ::") for c in project.get("classifiers", []))  # PEP 639 forbids both
        (requirement,) = pyproject["build-system"]["requires"]
        name, _, specifier = _requirement(requirement)
        assert name == "setuptools" and specifier == ">=77", requirement  # SPDX licenses need setuptools 77
    assert (REPO / "LICENSE").read_text() == (REPO / "lab" / "LICENSE").read_text()
    assert library["project"]["scripts"] == {"flora-opt": "flora_opt.cli:main"}
    assert lab["project"]["scripts"] == {"flora-lab": "flora_lab.cli:main"}
    # the lab requires this library, by its distribution name, at least this version
    requirements = [_requirement(r) for r in lab["project"]["dependencies"]]
    (ours,) = [r for r in requirements if r[0].startswith("flora")]
    assert ours[0] == "flora-optim" and ours[1] <= _extras(library)
    assert ours[2] == ">=" + library["project"]["version"]
    for name, extras, _ in (_requirement(r) for rs in lab["project"]["optional-dependencies"].values() for r in rs):
        assert not name.startswith("flora") or (name == "flora-optim" and extras <= _extras(library))
    # the examples' requirements install this checkout (a requirement `flora-opt` is the reference code)
    for path in sorted((REPO / "examples").rglob("requirements*.txt")):
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        assert ".[jax]" in lines or ".[torch]" in lines, path
        assert all(not line[:1].isalnum() or _requirement(line)[0] != "flora-opt" for line in lines), path


# a `pip install ...` hint, up to the end of its line
_HINT = re.compile(r"pip install(?P<args>(?:[ \t]+(?:'[^'\n]*'|\"[^\"\n]*\"|[^\s'\"`)]+))+)")


def _hinted(text):
    """``(target, extras)`` for each package a ``pip install ...`` hint in ``text`` names with extras."""
    for match in _HINT.finditer(text):
        for word in re.findall(r"'[^']*'|\"[^\"]*\"|[^\s'\"]+", match["args"]):
            target = word.strip("'\"")
            if "[" in target:
                name, _, extras = target.partition("[")
                yield name, {e.strip() for e in extras.rstrip("]").split(",")}


def _string_constants(path):
    """Every string the code at ``path`` writes: constants and the literal parts of f-strings (an
    f-string's placeholder becomes ``{}``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_every_extra_a_message_names_exists():
    """Each ``pip install X[extras]`` in the library's and the lab's messages and docstrings, the
    README and docs/ names this repository's distribution (or the lab's path) and extras it
    defines; the extras that the library's messages fill in at run time come from tables checked
    here too."""
    import flora_opt
    from flora_lab import cli as lab_cli
    from flora_opt import cli

    extras = {"flora-optim": _extras(_pyproject(".")), "lab": _extras(_pyproject("lab"))}
    extras["."], extras["./lab"] = extras["flora-optim"], extras["lab"]
    texts = [
        (path, text)
        for base in ("flora_opt", "lab/flora_lab")
        for path in sorted((REPO / base).rglob("*.py"))
        for text in _string_constants(path)
    ]
    texts += [(path, path.read_text()) for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]]
    texts += [(REPO / "Makefile", (REPO / "Makefile").read_text())]
    seen = 0
    for path, text in texts:
        for name, named in _hinted(text):
            where = f"{path.relative_to(REPO)}: pip install {name}[{','.join(sorted(named))}]"
            assert name in extras, f"{where}: not this repository's distribution (flora-optim) or lab"
            assert named == {"{}"} or named <= extras[name], where
            seen += 1
    assert seen > 5
    # the placeholders: the extra a missing module maps to
    assert {extra for _, _, extra, _ in flora_opt._LAZY.values()} <= extras["flora-optim"]
    assert set(cli._EXTRAS.values()) <= extras["flora-optim"]
    for hint in set(lab_cli._INSTALL.values()):
        assert all(named <= extras[name] for name, named in _hinted(hint)), hint


# ---- no third-party noise --------------------------------------------------------------------


def _run_quietly(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "lab")]))
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    "body",
    [
        # the first step with 8-bit states imports torchao
        "w = torch.nn.Parameter(torch.ones(64, 128))\n"
        "optimizer = flora_opt.Flora([w], lr=0.1, rank=8, quantization=True)\n"
        "w.grad = torch.ones_like(w)\n"
        "optimizer.step()\n",
        # every public name (transformers, behind FloraTrainer, imports torchao too)
        "for name in flora_opt.__all__:\n    getattr(flora_opt, name)\n",
    ],
    ids=["8bit-step", "public-names"],
)
def test_import_and_first_use_print_nothing(body):
    """Importing the library, its public names and the first step with 8-bit states write nothing
    to stderr: torchao's warnings about optional kernels a CPU build cannot load and torch's
    deprecation warning for torchao's enums are not ours to show."""
    for module in ("torchao", "transformers", "jax", "optax"):
        pytest.importorskip(module)
    code = f"import sys, torch, flora_opt\n{body}assert 'torchao' in sys.modules\nprint('done')\n"
    proc = _run_quietly([sys.executable, "-c", code])
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert proc.stderr == ""


def test_the_demo_and_the_estimator_print_only_their_own_output(tmp_path):
    """The demo's entry point (a tiny run, 8-bit Flora included, its estimate at scale built
    through transformers) and ``flora-opt memory`` write nothing to stderr."""
    pytest.importorskip("torchao")
    demo = [
        sys.executable,
        "-m",
        "flora_lab",
        "demo",
        "--steps",
        "1",
        "--eval-batches",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--no-plot",
        "--optimizers",
        "adamw",
        "flora_8bit",
        "--scale-model",
        "llama-60m",
        "--out",
        str(tmp_path),
    ]
    proc = _run_quietly(demo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("data: shakespeare_sample") and "On a 24 GiB GPU" in proc.stdout
    proc = _run_quietly([sys.executable, "-m", "flora_opt", "memory", "llama-60m"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_without_torchao_8bit_states_name_the_extra():
    result = _run(
        "torchao",
        """
        import torch, flora_opt
        w = torch.nn.Parameter(torch.ones(64, 128))
        optimizer = flora_opt.Flora([w], lr=0.1, rank=8, quantization=True)
        w.grad = torch.ones_like(w)
        try:
            optimizer.step()
        except ImportError as error:
            assert "Flora(quantization=True) needs torchao" in str(error), error
            assert "pip install 'flora-optim[torch]'" in str(error), error
            print("OK")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
