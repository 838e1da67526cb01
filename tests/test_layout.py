"""The tree is the map (cnkit/__init__.py): each folder is a layer, a module imports only its own folder and the
folders below it (function-level imports included), and no import cycle exists. The front door (cnkit/__init__.py,
cnkit/__main__.py) may reach any layer: it only re-exports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cnkit

PACKAGE = Path(cnkit.__file__).parent
# bottom-up; "" is the package's top: foundations and pure measures
LAYERS = ["", "data", "models", "generation", "training", "experiments", "surfaces"]
FRONT_DOOR = {PACKAGE / "__init__.py", PACKAGE / "__main__.py"}


def _module_name(path: Path) -> str:
    """``data.toyworld`` for cnkit/data/toyworld.py; a package by its folder (``models.architectures``)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if p not in FRONT_DOOR}


def layer(module: str) -> int:
    """A module's floor: its top folder's index in LAYERS (top-level files are floor 0)."""
    parts = module.split(".")
    return LAYERS.index(parts[0]) if len(parts) > 1 or parts[0] in LAYERS[1:] else 0


def _resolve(parts: list[str], known) -> str:
    """The longest known module that ``parts`` (a dotted path inside cnkit) names."""
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in known:
            return ".".join(parts[:k])
    return parts[0]


def _cnkit_imports(path: Path, known) -> set[str]:
    """cnkit modules that ``path`` imports anywhere (top level or inside functions)."""
    name = _module_name(path)
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, from . import x, from ..x import y
                anchor = package[: len(package) - (node.level - 1)]
                if node.module:
                    base = anchor + node.module.split(".")
                    found.update(_resolve(base + [a.name], known) for a in node.names)
                else:
                    found.update(_resolve(anchor + [alias.name], known) for alias in node.names)
            elif node.module and node.module.startswith("cnkit."):
                base = node.module.split(".")[1:]
                found.update(_resolve(base + [a.name], known) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(_resolve(a.name.split(".")[1:], known) for a in node.names if a.name.startswith("cnkit."))
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _cnkit_imports(p, modules) for m, p in modules.items()}


def test_every_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(LAYERS[1:])


def test_modules_import_only_their_layer_or_below():
    upward = [f"{m} (floor {layer(m)}) imports {d} (floor {layer(d)})"
              for m, deps in _graph().items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward


def test_no_import_cycles():
    # a package's __init__ re-exports its own modules, so an edge into one's own package is not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _graph().items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_measures_generate_nothing_and_generation_trains_nothing():
    graph = _graph()
    assert all(layer(d) == 0 for d in graph["metrics"])
    assert not {d for m in graph if layer(m) <= LAYERS.index("generation") for d in graph[m]
                if layer(d) >= LAYERS.index("training")}
    architectures = {d for m in graph if m.startswith("models.architectures") for d in graph[m]}
    assert all(layer(d) <= LAYERS.index("models") for d in architectures)


def test_the_curated_names_resolve():
    for name in cnkit.__all__:
        assert getattr(cnkit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cnkit.nope  # noqa: B018


def test_import_cnkit_loads_no_model_library():
    """``import cnkit`` (and so ``cnkit --help``) does not pull in torch or diffusers: names load on first use."""
    code = "import sys, cnkit; print(any(m in sys.modules for m in ('torch', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shipped_files_record_no_path_of_the_machine_that_made_them():
    """Cards, configurations and tables under data/ hold paths relative to the checkout (card.portable), never a
    builder's absolute path, which a user's machine does not have."""
    import re

    root = PACKAGE.parent / "data"
    found = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".md", ".json", ".csv")
             and p.is_file() and re.search(r'"/(work|tmp|home|root|Users)/', p.read_text(errors="ignore"))]
    assert not found, found


def test_no_module_imports_through_the_front_door():
    """``from . import colours`` inside cnkit (or ``from .. import params`` one floor down) names the package
    ``cnkit`` itself, whose front door lists every layer: a cycle through it. Modules import a module by its path."""
    found = []
    for module, path in _modules().items():
        package = module.split(".") if path.stem == "__init__" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and not node.module:
                if not package[: len(package) - (node.level - 1)]:
                    found.append(f"{module}: from {'.' * node.level} import ...")
            elif isinstance(node, ast.ImportFrom) and node.module == "cnkit":
                found.append(f"{module}: from cnkit import ...")
    assert not found, found
