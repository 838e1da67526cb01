"""``make figures``: run the notebooks through papermill and write a report.

    python -m cnkit.report [--profile full] [--run NAME] [--only 00 04 ...] [--force]

Each notebook runs with ``profile`` and ``out_dir=reports/<run>/<notebook>/``; the executed copy
lands beside its outputs. ``reports/<run>/index.md`` gets one section per notebook: its title, the
figures it declares (``metadata.cnkit.outputs``) and its ``summary.json`` if it writes one. The
figures named in ``metadata.cnkit.key_figures`` are copied to ``docs/`` for the README.

A notebook is skipped when its last run in this folder finished with the same notebook source
and parameters (a stamp file holds their hash), so an interrupted ``make figures`` resumes where it
stopped. Notebooks that set ``metadata.cnkit.report = false`` (pretraining) are never run here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("cnkit", {})
        if meta.get("report", True) and (not only or any(path.stem.startswith(o) for o in only)):
            found.append(path)
    return found


def _stamp(path: Path, parameters: dict) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    return h.hexdigest()


def _title(nb: dict, fallback: str) -> str:
    for cell in nb["cells"]:
        src = "".join(cell["source"]).strip()
        if cell["cell_type"] == "markdown" and src.startswith("#"):
            return src.splitlines()[0].lstrip("# ").strip()
    return fallback


def run_notebook(path: Path, run_dir: Path, profile: str, force: bool = False) -> tuple[str, float]:
    import papermill as pm

    out_dir = run_dir / path.stem
    meta = json.loads(path.read_text()).get("metadata", {}).get("cnkit", {})
    parameters = {**meta.get("headless_parameters", {}), "profile": profile, "out_dir": str(out_dir)}
    stamp_file, stamp = out_dir / ".cnkit-stamp", _stamp(path, parameters)
    if not force and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return "cached", 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pm.execute_notebook(str(path), str(out_dir / path.name), parameters=parameters, cwd=str(path.parent),
                        progress_bar=False, kernel_name="python3")
    stamp_file.write_text(stamp)
    return "ran", time.perf_counter() - start


def write_index(run_dir: Path, paths: list[Path], timings: dict[str, float]) -> Path:
    lines = [f"# cnkit report: {run_dir.name}", ""]
    for path in paths:
        nb = json.loads(path.read_text())
        meta = nb["metadata"].get("cnkit", {})
        out_dir = run_dir / path.stem
        lines += [f"## {_title(nb, path.stem)}", "", f"Notebook: [{path.name}]({path.stem}/{path.name})"
                  + (f", {timings[path.stem]:.0f} s" if timings.get(path.stem) else ""), ""]
        for name in meta.get("outputs", []):
            if name.endswith(".png") and (out_dir / name).is_file():
                lines += [f"![{name}]({path.stem}/{name})", ""]
        summary = out_dir / "summary.json"
        if summary.is_file():
            lines += ["```json", summary.read_text()[:3000], "```", ""]
    index = run_dir / "index.md"
    index.write_text("\n".join(lines))
    return index


def copy_key_figures(run_dir: Path, paths: list[Path], docs: Path) -> list[Path]:
    docs.mkdir(exist_ok=True)
    copied = []
    for path in paths:
        for name in json.loads(path.read_text())["metadata"].get("cnkit", {}).get("key_figures", []):
            src = run_dir / path.stem / name
            if src.is_file():
                copied.append(Path(shutil.copy(src, docs / f"{path.stem}_{name}")))
    return copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", choices=["full", "smoke"])
    ap.add_argument("--run", default=None, help="folder name under reports/ (default: the profile)")
    ap.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 04")
    ap.add_argument("--force", action="store_true", help="rerun notebooks even when their stamp matches")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = ROOT / "reports" / (args.run or args.profile)
    paths = notebooks(args.only)
    timings, total = {}, time.perf_counter()
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ({args.profile}) ...", end=" ", flush=True)
        try:
            status, seconds = run_notebook(path, run_dir, args.profile, args.force)
        except Exception as e:
            print(f"FAILED: {type(e).__name__}: {str(e)[:2000]}")
            print(f"the executed notebook is in {run_dir / path.stem}; fix and rerun: finished ones are cached")
            return 1
        timings[path.stem] = seconds
        print(f"{status} in {seconds:.0f} s" if status == "ran" else status, flush=True)
    index = write_index(run_dir, paths, timings)
    copied = copy_key_figures(run_dir, paths, ROOT / "docs") if args.profile == "full" else []
    print(f"report: {index.relative_to(ROOT)}; {len(copied)} figures copied to docs/; "
          f"{time.perf_counter() - total:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
