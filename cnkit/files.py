"""Files the kit writes and reads back later are written whole or not at all.

``write_atomic(path, data)`` writes a sibling temporary file and renames it over ``path`` (``os.replace``, atomic
on one file system): a kill at any instant leaves either the old file or the new one, never half of either. That is
what a kill can do to a process; a power cut can still lose what the OS had not flushed (no ``fsync``: the kit's
files are cheap to make again, and syncing every table row would cost more than it saves).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A name beside ``path`` for its next version (hidden, per process, so two writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, value, **dumps) -> Path:
    """``value`` as JSON at ``path``, atomically (``write_atomic``); ``dumps``: ``json.dumps`` options."""
    return write_atomic(path, json.dumps(value, **({"indent": 1} | dumps)))
