"""Model cards for what the kit ships (``data/tiny-sd``, shipped ControlNets): a README.md in the
folder with the recipe, the measured figures, how to rebuild, and the SHA-256 of every file, so a
test can tell that the shipped weights are the ones the card describes."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

from .files import file_sha256
from .params import REPO_ROOT

HASHES_BEGIN, HASHES_END = "<!-- sha256 begin -->", "<!-- sha256 end -->"


def file_hashes(folder) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the card itself, by relative path."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "README.md"}


def card_hashes(folder) -> dict[str, str]:
    """The hashes a card records (parsed back from its README.md)."""
    text = (Path(folder) / "README.md").read_text()
    block = text[text.index(HASHES_BEGIN) + len(HASHES_BEGIN):text.index(HASHES_END)]
    return dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", block, flags=re.M))


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def portable(value, root=REPO_ROOT):
    """``value`` (JSON-like) with every absolute path made machine-free: relative to ``root`` (the kit's checkout)
    when inside it, else its last part. A shipped artifact holds no path of the machine that made it."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(portable(v, root) for v in value)
    if isinstance(value, str) and value.startswith("/") and "\n" not in value:
        path, root = Path(value), Path(root).resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    return value


def write_card(folder, title: str, sections: dict[str, str], data: dict) -> Path:
    """README.md with ``sections`` (markdown, in order), ``data`` as JSON (its paths made portable), then the file
    hashes."""
    folder = Path(folder)
    data = portable(data)
    lines = [f"# {title}", ""]
    for heading, body in sections.items():
        lines += [f"## {heading}", "", body.strip(), ""]
    lines += ["## Recorded data", "", "```json", json.dumps(data, indent=1), "```", "",
              "## Files (SHA-256)", "", HASHES_BEGIN, "| file | sha256 |", "|---|---|"]
    lines += [f"| `{name}` | `{digest}` |" for name, digest in file_hashes(folder).items()]
    lines += [HASHES_END, ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def card_data(folder) -> dict:
    """The JSON block a card recorded."""
    text = (Path(folder) / "README.md").read_text()
    block = text.split("## Recorded data", 1)[1]
    return json.loads(block.split("```json", 1)[1].split("```", 1)[0])
