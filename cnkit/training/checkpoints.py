"""Run folders that survive kills, second processes and changed minds: what the ControlNet trainer and the
base's pretraining share.

- ``Checkpoint``: a folder that holds one complete checkpoint at every instant. A new one is written
  beside it (``NAME.tmp``), its state file last; then the old one moves aside (``NAME.old``), the new one
  takes its name, and the old one goes. A kill between any two of those operations leaves at least one
  complete checkpoint, and ``recover()`` (called before every load and save) puts the newest complete one
  back under ``NAME`` and clears the rest, so a rerun resumes from it.
- ``claim(folder, ...)``: one owner at a time (an OS file lock, which a dead process does not keep), and
  the configuration fixed at first use: a rerun with another configuration is refused before it can
  overwrite anything, even when the first run died before its first checkpoint.

Loading never unpickles: weights are safetensors, optimizer state goes through ``torch.load(...,
weights_only=True)``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from ..files import write_json


class FolderBusy(RuntimeError):
    """Another live process owns the run folder."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (a file missing, damaged or not the kit's); says which and what to
    do."""


def checkpoint_error(e: Exception, folder: Path) -> CheckpointError:
    """Why the checkpoint in ``folder`` did not load, in words: the file, what is wrong with it, the fix. Nothing is
    deleted: the fix is the user's to choose."""
    start_over = (f"delete {folder} to train again from step 0 (the run's tables restart with it), or restore the "
                  "file from a copy")
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"the checkpoint in {folder} is incomplete: {Path(e.filename or '?').name} is missing "
                               f"(deleted, or never copied). It cannot be resumed: {start_over}")
    if "weights_only" in text or "Unpickl" in text or "Unsupported global" in text:
        return CheckpointError(f"the checkpoint in {folder} holds an optimizer state that torch refuses to unpickle "
                               "safely (weights_only=True: it holds objects the kit never writes), so it was not "
                               f"loaded. {start_over}")
    if isinstance(e, KeyError):
        return CheckpointError(f"the checkpoint in {folder} is not the kit's: its state file has no {e}. It cannot "
                               f"be resumed: {start_over}")
    return CheckpointError(f"the checkpoint in {folder} is damaged ({text[:300]}). It cannot be resumed: "
                           f"{start_over}")


def _step(folder: Path, state_file: str) -> int | None:
    """The step of a complete checkpoint (its state file is written last), else None."""
    try:
        return int(json.loads((folder / state_file).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def disk_error(e: Exception, where: Path) -> Exception:
    """A full disk or a read-only folder said in words, with what was kept and what to do."""
    # torch.save reports a full disk as a RuntimeError from its zip writer, not as an OSError
    torch_full = isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e))
    if torch_full or getattr(e, "errno", None) == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on the disk while writing {where}; the last complete checkpoint "
                                "is kept. Free some space (or pass an out_dir on another disk) and rerun to resume")
    if getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(e.errno, f"cannot write to {where} ({os.strerror(e.errno)}); pass an out_dir you can "
                                "write to")
    return e


class Checkpoint:
    """A checkpoint folder that is complete at every instant (see the module docstring)."""

    def __init__(self, path, state_file: str = "state.json"):
        self.path = Path(path)
        self.state_file = state_file
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.old = self.path.with_name(self.path.name + ".old")

    def recover(self) -> None:
        """Make ``path`` the newest complete checkpoint among it and a save's leftovers; clear the rest."""
        steps = {p: _step(p, self.state_file) for p in (self.path, self.tmp, self.old)}
        complete = [p for p, s in steps.items() if s is not None]
        if not complete:
            for p in (self.tmp, self.old):
                _remove(p)
            return
        best = max(complete, key=lambda p: steps[p])
        if best != self.path:
            _remove(self.path)
            best.rename(self.path)
        for p in (self.tmp, self.old):
            _remove(p)

    def exists(self) -> bool:
        self.recover()
        return _step(self.path, self.state_file) is not None

    def state(self) -> dict | None:
        self.recover()
        f = self.path / self.state_file
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"the checkpoint in {self.path} is damaged: its {f.name} does not read as JSON "
                                  f"({e}). It cannot be resumed: delete {self.path} to train again from step 0 (the "
                                  "run's tables restart with it), or restore the file from a copy") from e

    def save(self, write: Callable[[Path], None], state: dict) -> None:
        """``write(folder)`` writes the files; then ``state`` (it must hold ``step``) goes in last."""
        self.recover()
        try:
            _remove(self.tmp)
            self.tmp.mkdir(parents=True)
            write(self.tmp)
            (self.tmp / self.state_file).write_text(json.dumps(state))
            if self.path.exists():
                self.path.rename(self.old)
            self.tmp.rename(self.path)
            _remove(self.old)
        except (OSError, RuntimeError) as e:
            raise disk_error(e, self.tmp) from e


def refuse_other_config(folder: Path, what: str, saved: dict, current: dict, ignore=()) -> None:
    """Resuming from another configuration would silently mix two runs: name the difference instead."""
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"{folder} holds {what} with another configuration ({diff}); pass a new out_dir, or "
                         "delete that folder to start over")


def claim(folder, config: dict, config_file: str, what: str, ignore=(), saved: dict | None = None,
          defaults: dict | None = None) -> FileLock:
    """Own ``folder`` for this process and fix its configuration. Returns the held lock (release it, or let
    the process end). Refuses a folder another live process holds, one that is a file, and one written
    with another configuration (``config_file`` in it, else ``saved``: what an older folder recorded
    elsewhere). Settings in ``ignore`` may change between sittings (a longer run, another log interval);
    ``defaults`` are settings added after a folder may have been written: one that does not record them
    ran with these values (a run interrupted before an upgrade resumes after it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"out_dir {folder} is a file; pass a folder path (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".owner.lock"))
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderBusy(f"another process is writing into {folder} right now (it holds {folder / '.owner.lock'}); "
                         "wait for it to finish, or pass another out_dir") from None
    except OSError as e:
        raise disk_error(e, folder) from e
    path = folder / config_file
    try:
        try:
            before = json.loads(path.read_text()) if path.is_file() else saved
        except ValueError:  # cut short by hand (the kit writes it whole): the checkpoint's copy decides
            before = saved
        if before is not None:
            refuse_other_config(folder, what, {**(defaults or {}), **before}, config, ignore)
        write_json(path, config)
    except BaseException:
        lock.release()
        raise
    return lock
