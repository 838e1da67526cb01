"""ControlNets and adapters read from disk once, not at every ``generate`` call.

The playground generates again and again with the same units, and the evaluations measure the same folder in
several settings; each used to read the weights again. ``load_net(spec, unet)`` keeps the last few nets read from a
folder or file (``MAX_NETS``, least recently used dropped first), keyed by the resolved path and the newest
modification time (and size) of the files in it, so a folder that is overwritten (a rebuilt net, a run that trained
on) is read again, and a net that is merely asked for again is not. A net given as an object is returned as it is.

What is cached is the loaded model itself: callers must not train it or change its weights in place (generation
and the evaluations do neither). ``forget()`` empties the cache.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from ..models.architectures import PAPER_NETS
from ..models.architectures import load as load_adapter
from ..models.architectures.base import ARCHITECTURE_FILE
from ..models.controlnets import load_controlnet
from ..params import repo_path

MAX_NETS = 4  # an SD-scale ControlNet holds about 1.4 GB
_CACHE: OrderedDict = OrderedDict()
loads = {"count": 0}  # how many nets were read from disk (tests read it)


def _stamp(path: Path) -> tuple:
    """The newest modification time and the total size of the files under ``path`` (or of the file itself)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats), len(stats)


def adapter_name(folder: Path) -> str | None:
    """The architecture a run folder's net was saved as (its ``cnkit_architecture.json``), or None."""
    meta = Path(folder) / ARCHITECTURE_FILE
    return json.loads(meta.read_text()).get("architecture") if meta.is_file() else None


def is_successor_folder(spec) -> bool:
    """A folder that only cnkit reads (a successor's or a Control-LoRA's): the trainer writes the architecture
    file for every run, so the name decides before anything is loaded."""
    if not isinstance(spec, str | Path):
        return False
    name = adapter_name(repo_path(spec))
    return name is not None and name not in PAPER_NETS.values()


def load_net(spec, unet=None):
    """The net ``spec`` names (see the module docstring): a successor's folder as its
    ``cnkit.models.architectures`` adapter (``unet``: the base it drives, which a Control-LoRA is rebuilt from),
    any other folder, hub id or original-layout file as ``load_controlnet`` reads it; a model as it is."""
    if not isinstance(spec, str | Path):  # a model: as it is
        return spec
    path = repo_path(spec)
    successor = is_successor_folder(path)
    if not path.exists():  # a hub id, or a missing folder (load_controlnet says which)
        return load_controlnet(spec, unet)
    # the base matters where the net is rebuilt from it (a Control-LoRA) or configured by it (a bare original file)
    by_base = successor or path.is_file()
    key = (str(path.resolve()), _stamp(path), id(unet) if by_base else None)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    for old in [k for k in _CACHE if k[0] == key[0]]:  # an older version of the same folder
        del _CACHE[old]
    net = load_adapter(path, unet) if successor else load_controlnet(path, unet)
    loads["count"] += 1
    _CACHE[key] = net
    while len(_CACHE) > MAX_NETS:
        _CACHE.popitem(last=False)
    return net


def forget() -> None:
    """Empty the cache (the nets are freed when nothing else holds them)."""
    _CACHE.clear()
