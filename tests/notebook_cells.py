"""Reading a notebook's parameters cell, for the tests that hold notebooks' defaults to what the kit ships."""

import ast
import json
from pathlib import Path


def notebook_parameters(path: Path) -> dict:
    """The typed literal assignments (``name: type = value``) of the cell tagged ``parameters``, papermill's cell;
    tests/test_notebooks.py holds every notebook's parameters to that form."""
    nb = json.loads(Path(path).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return {node.target.id: ast.literal_eval(node.value) for node in ast.parse("".join(cell["source"])).body
            if isinstance(node, ast.AnnAssign)}
