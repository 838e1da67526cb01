"""The module map of cnkit/__init__.py holds: every module is placed in a layer, imports only its own layer or
those below (function-level imports included), and no import cycle exists."""

import ast
from pathlib import Path

import cnkit

PACKAGE = Path(cnkit.__file__).parent


def _module_name(path: Path) -> str:
    """``bases`` for cnkit/bases.py; a subpackage's modules by dotted name: ``architectures`` (its __init__),
    ``architectures.base``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(parts: list[str]) -> str:
    """The longest module on the map that ``parts`` (a dotted import path inside cnkit) names."""
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in cnkit.LAYERS:
            return ".".join(parts[:k])
    return parts[0]


def _cnkit_imports(path: Path) -> set[str]:
    """cnkit modules that ``path`` imports anywhere (top level or inside functions)."""
    name = _module_name(path)
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, from . import x, from ..x import y
                anchor = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.add(_resolve(anchor + node.module.split(".")))
                else:
                    found.update(_resolve(anchor + [alias.name]) for alias in node.names)
            elif node.module and node.module.startswith("cnkit."):
                found.add(_resolve(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            found.update(_resolve(a.name.split(".")[1:]) for a in node.names if a.name.startswith("cnkit."))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _cnkit_imports(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}


def test_every_module_is_on_the_map():
    assert set(_graph()) == set(cnkit.LAYERS)


def test_modules_import_only_their_layer_or_below():
    upward = [f"{m} (layer {cnkit.LAYERS[m]}) imports {d} (layer {cnkit.LAYERS[d]})"
              for m, deps in _graph().items() for d in deps if cnkit.LAYERS[d] > cnkit.LAYERS[m]]
    assert not upward, upward


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
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
    assert not graph["metrics"] & {"generate", "train", "telemetry", "evaluations", "bases", "controlnets"}
    assert not graph["generate"] & {"train", "telemetry", "pretrain"}
    assert not {d for m in ("tiny", "bases", "controlnets", "tokenizer") for d in graph[m]} & {"train", "pretrain"}
    architectures = {d for m in graph if m.split(".")[0] == "architectures" for d in graph[m]}
    assert not architectures & {"train", "telemetry", "pretrain", "generate", "weighting", "evaluations"}
