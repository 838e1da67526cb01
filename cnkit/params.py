"""Notebook parameters: profiles, type coercion and output folders.

Every notebook's ``parameters`` cell holds typed literals; papermill overrides them with values
from the command line or YAML, where ``1`` arrives as an int even when ``1.0`` was meant and a
number may arrive as a string. The cell after it calls ``settings(...)`` (or the pieces below) so
that a notebook fails early, with the parameter's name, instead of deep inside a training loop.
"""

from __future__ import annotations

import os
from pathlib import Path

PROFILES = ("smoke", "full")


def resolve_profile(profile: str = "auto") -> str:
    """``"auto"`` reads the environment variable ``CNKIT_PROFILE`` (default ``"full"``)."""
    chosen = os.environ.get("CNKIT_PROFILE", "full") if profile == "auto" else profile
    if chosen not in PROFILES:
        raise ValueError(f"profile must be 'auto', 'smoke' or 'full', got {chosen!r}"
                         + (" (from CNKIT_PROFILE)" if profile == "auto" else ""))
    return chosen


def coerce(name: str, value, kind: type, minimum=None, maximum=None):
    """``value`` as ``kind`` (int, float, bool, str), or a ValueError that names the parameter.

    Accepts what papermill produces for a human's intent: ``2`` or ``"2"`` for a float, ``2.0``
    for an int, ``"true"``/``"1"`` for a bool. Rejects lossy or meaningless ones (``2.5`` as int).
    """
    try:
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                out = value.strip().lower() in ("true", "1", "yes")
            elif isinstance(value, bool | int) and value in (0, 1):
                out = bool(value)
            else:
                raise ValueError
        elif kind is int:
            f = float(value)
            if isinstance(value, bool) or f != int(f):
                raise ValueError
            out = int(f)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        else:
            out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"parameter {name} must be {kind.__name__}, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"parameter {name} must be at least {minimum}, got {out!r}")
    if maximum is not None and out > maximum:
        raise ValueError(f"parameter {name} must be at most {maximum}, got {out!r}")
    return out


def by_profile(profile: str, smoke, full):
    """The smoke value or the full value of a size that the profile decides."""
    return smoke if resolve_profile(profile) == "smoke" else full


def out_path(out_dir) -> Path:
    """The run's output folder, created. Notebooks write every result here as a file."""
    path = Path(out_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_path(path) -> Path:
    """``path`` as given when it exists, else relative to the kit's checkout (``data/...`` from a
    notebook whose working directory is ``notebooks/``)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    root = Path(__file__).resolve().parent.parent
    return root / p if (root / p).exists() else p
