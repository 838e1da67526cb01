"""Files the kit writes and reads back later are written whole or not at all.

``write_atomic(path, data)`` writes a sibling temporary file and renames it over ``path`` (``os.replace``, atomic
on one file system): a kill at any instant leaves either the old file or the new one, never half of either. That is
what a kill can do to a process; a power cut can still lose what the OS had not flushed (no ``fsync``: the kit's
files are cheap to make again, and syncing every table row would cost more than it saves).

Commands that write weights (``cnkit init``, ``cnkit export``, ``cnkit sd15``) check their output first
(``check_output``): never into the folder they read, never into a run's checkpoint, and never over weights unless
``--overwrite``; folders are written through a temporary sibling (``write_folder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def file_sha256(path) -> str:
    """A file's SHA-256 (hex), streamed rather than read whole: an SD 1.5 UNet file is 3.4 GB."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


# --- commands that write weights: never over a trained net unless told, never into what they read -----------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def holds_weights(path) -> bool:
    """Is ``path`` a weights file, or a folder holding one (a model folder, a pipeline's, a checkpoint)?"""
    path = Path(path)
    if path.is_file():
        return path.suffix in WEIGHT_SUFFIXES
    return path.is_dir() and any(f.suffix in WEIGHT_SUFFIXES and f.is_file()
                                 for f in (*path.glob("*"), *path.glob("*/*")))  # a model's or a pipeline's


def run_checkpoint(path) -> Path | None:
    """The training run's checkpoint folder ``path`` is (or lies in), else None: its state file says so."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / "trainer_state.json").is_file() or ((folder / "state.json").is_file()  # cnkit.training.*
                                                         and (folder / "optimizer.pt").is_file()):
            return folder
    return None


def check_output(out, overwrite: bool, sources=(), flag: str = "--overwrite", folder: bool | None = None) -> None:
    """Refuse, before anything is written, an output that would destroy something: a path inside (or holding) a
    folder it reads from, a run's checkpoint (never: a run would resume from weights its optimizer state does not
    belong to), or one that holds weights, unless ``overwrite``; and (``folder`` True or False) a file where a
    folder is written, or a folder where a file is. Raises FileExistsError naming the fix."""
    out = Path(out).resolve()
    if folder is not None and out.exists() and out.is_dir() != folder:
        raise FileExistsError(f"{out} is a {'file' if folder else 'folder'}; this command writes a "
                              f"{'folder' if folder else 'file'} there: pass another path")
    for src in sources:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise FileExistsError(f"{out} lies in {src}, which this command reads: it would write over what it reads "
                                  "(and a half-written file there destroys it). Pass an output outside it")
    ckpt = run_checkpoint(out)
    if ckpt is not None:
        raise FileExistsError(f"{out} is in a training run's checkpoint ({ckpt} holds its trainer state): writing "
                              "weights there would make the run resume from them with an optimizer state that is not "
                              f"theirs ({flag} does not change this). Pass another output, or delete the run folder "
                              "to start that run over")
    if holds_weights(out) and not overwrite:
        raise FileExistsError(f"{out} already holds weights (a trained net?): nothing was written. Pass {flag} to "
                              "replace them, or another output")


def write_folder(out, write) -> Path:
    """``write(folder)`` into a temporary sibling of ``out``, then its files into ``out`` one rename each (files of
    ``out`` that ``write`` does not make are kept): a kill leaves whole files only, never a half-written one."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if not out.exists():
            os.replace(tmp, out)
            return out
        # weights before configs: a kill between leaves the old config beside the new weights, which loading names
        files = sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: (f.suffix == ".json", str(f)))
        for f in files:
            dest = out / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
