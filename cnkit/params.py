"""Notebook parameters: profiles, type coercion and output folders.

Every notebook's ``parameters`` cell holds typed literals; papermill overrides them with values
from the command line or YAML, where ``1`` arrives as an int even when ``1.0`` was meant and a
number may arrive as a string. The cell after it calls ``settings(...)`` (or the pieces below) so
that a notebook fails early, with the parameter's name, instead of deep inside a training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    if kind is float and not math.isfinite(out):  # NaN passes every bound check, inf none usefully
        raise ValueError(f"parameter {name} must be a finite number, got {value!r}")
    if minimum is not None and out < minimum:
        raise ValueError(f"parameter {name} must be at least {minimum}, got {out!r}")
    if maximum is not None and out > maximum:
        raise ValueError(f"parameter {name} must be at most {maximum}, got {out!r}")
    return out


def coerce_fields(obj) -> None:
    """Coerce every field of a dataclass instance to its annotated type (int, float, bool, str), naming the
    field when a value cannot be (what papermill and command lines pass: ints for floats, numbers as text)."""
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    for f in dataclasses.fields(obj):
        kind = kinds[f.type if isinstance(f.type, str) else f.type.__name__]
        setattr(obj, f.name, coerce(f.name, getattr(obj, f.name), kind))


def by_profile(profile: str, smoke, full):
    """The smoke value or the full value of a size that the profile decides."""
    return smoke if resolve_profile(profile) == "smoke" else full


def _fields(values) -> dict:
    return dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)


def say_overrides(profile: str, used, full) -> None:
    """Under the smoke profile, print what it changed: each value ``used`` (a dict or a dataclass, e.g. a run's
    TrainConfig) that differs from ``full``'s (what the parameters give), so a reader of the parameters cell is not
    misled about the sizes that ran."""
    if resolve_profile(profile) != "smoke":
        return
    used, full = _fields(used), _fields(full)
    changed = [f"{k}={used[k]!r} (parameter: {full[k]!r})" for k in used if k in full and used[k] != full[k]]
    if changed:
        print("smoke profile, the same code at tiny sizes: " + ", ".join(changed))


def profile_values(profile: str, **pairs) -> dict:
    """``name=(smoke, full)`` pairs -> the value of each that ``profile`` uses; the smoke profile's changes are
    printed (``say_overrides``)."""
    smoke = resolve_profile(profile) == "smoke"
    used = {k: (s if smoke else f) for k, (s, f) in pairs.items()}
    say_overrides(profile, used, {k: f for k, (_, f) in pairs.items()})
    return used


def out_path(out_dir) -> Path:
    """The run's output folder, created. Notebooks write every result here as a file."""
    path = Path(out_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# The kit's checkout (cnkit/ sits in it): where data/, notebooks/ and reports/ are.
REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(path) -> Path:
    """``path`` as given when it exists, else relative to the kit's checkout (``data/...`` from a
    notebook whose working directory is ``notebooks/``)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def notebook_outputs(notebook: str) -> list[str]:
    """The files a notebook declares it writes (``metadata.cnkit.outputs`` of ``notebooks/<notebook>.ipynb``)."""
    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    return json.loads(path.read_text())["metadata"]["cnkit"]["outputs"]


def check_outputs(out_dir, notebook: str) -> list[str]:
    """A notebook's last cell: every file it declares exists in ``out_dir`` and is not empty (whoever runs it:
    nbval, papermill, make figures or a person). Returns the files."""
    names = notebook_outputs(notebook)
    missing = [n for n in names if not (Path(out_dir) / n).is_file() or not (Path(out_dir) / n).stat().st_size]
    if missing:
        raise AssertionError(f"{notebook} did not write {', '.join(missing)} into {out_dir}")
    return names
