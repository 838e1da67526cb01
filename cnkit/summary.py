"""``summary.json``: what a notebook measured, in the one shape ``make figures``' report reads.

A figure notebook states the paper's claim, the kit's measurement in words, and named checks computed
from the data; whether the claim held is the conjunction of the checks (never typed in), or undecided
when there is nothing to check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .files import write_json


def _plain(value):
    """numpy scalars and arrays as JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_summary(out_dir, profile: str, claim: str | None = None, result: str | None = None,
                  checks: dict[str, bool] | None = None, **data) -> dict:
    """Write ``out_dir/summary.json`` and return it: ``profile``, and with a ``claim`` also ``paper_claim``,
    ``kit_result``, ``checks`` and ``held`` (all checks true; None without checks), then ``data``."""
    summary = {"profile": profile}
    if claim is not None:
        checks = {name: bool(ok) for name, ok in (checks or {}).items()}
        summary |= {"paper_claim": claim, "kit_result": result, "held": all(checks.values()) if checks else None,
                    "checks": checks}
    summary |= data
    write_json(Path(out_dir) / "summary.json", summary, default=_plain)
    return summary


def read_summary(out_dir) -> dict:
    """A notebook's summary.json, or {} when it wrote none."""
    f = Path(out_dir) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}
