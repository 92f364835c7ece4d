"""Checkpoints that survive a crash at any moment, and the training state they hold.

A file is written to a temporary name in the same folder, flushed to disk, then renamed over
the old one: a rename within a file system is atomic, so a reader (or a resumed run) sees the
old checkpoint or the new one, never half of one. Everything saved loads with
``torch.load(weights_only=True)``: RNG states are converted to tensors and plain values.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ei.model.checkpoint import torch_load


def _file_mode() -> int:
    """What the umask gives a new file (mkstemp makes its files 0600, private to the user,
    where every other file the user writes, PNGs included, follows the umask). Read once, at
    import: os.umask can only be read by setting it, which would race with other threads."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def _write_failure(err: BaseException, path: Path) -> BaseException:
    """A full disk as a plain OSError saying so. torch.save reports some write failures as
    RuntimeError("[enforce fail at inline_container.cc...] unexpected pos ...")."""
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    if isinstance(err, RuntimeError) and "inline_container" in str(err):
        full = shutil.disk_usage(path.parent).free < (64 << 20)
        if not full:
            return OSError(errno.EIO, f"could not write {path.name} ({err})", str(path))
    if full:
        free = shutil.disk_usage(path.parent).free >> 20
        return OSError(errno.ENOSPC, f"no space left on the device of {path.parent} "
                                     f"({free} MiB free) while writing {path.name}", str(path))
    return err


def _atomic_write(write, path: str | Path, mode: str) -> None:
    """`write(f)` into a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # Also on KeyboardInterrupt: leave no stray temp file, keep the previous version.
        Path(tmp).unlink(missing_ok=True)
        failure = _write_failure(err, path)
        if failure is err:
            raise
        raise failure from err
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (temp file + fsync + os.replace)."""
    _atomic_write(lambda f: torch.save(obj, f), path, "wb")


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a small text file (logs, results) atomically, as atomic_save."""
    _atomic_write(lambda f: f.write(text), path, "w")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path, what: str = "checkpoint") -> dict:
    """Load a file written by atomic_save, with an error naming the path if it is absent or
    cannot be read (ei.model.checkpoint.CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return torch_load(path, what)


def rng_state() -> dict:
    """The state of every random generator a training step may draw from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
