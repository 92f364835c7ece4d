"""A run directory: the resolved config (so the run can be rebuilt) and one folder per stage.

    <run>/config.yaml            the complete, resolved configuration
    <run>/classes.json           the class names in the order of the models' outputs
    <run>/single/<modality>/     stage one, per modality
    <run>/ei/  <run>/late_fusion/
    <run>/summary.csv, summary.json
each stage folder holding last.pt, best.pt, metrics.jsonl, curves.png and result.json.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ei.data.annotations import DataError

from .config import Config, ConfigError, from_dict, read_run_config, save_config

CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
LOCK_FILE = ".lock"
# What a run holds before its first trained epoch: nothing worth keeping after a failed start.
_START_FILES = (CONFIG_FILE, CLASSES_FILE, LOCK_FILE)


class RunDirError(FileNotFoundError):
    """A run directory or one of its files is missing, or a new run would overwrite one."""


@dataclass(frozen=True)
class RunDir:
    path: Path
    created: bool = field(default=False, compare=False)  # this process made the directory

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def stage_dir(self, stage: str) -> Path:
        return self.path.joinpath(*stage.split("/"))

    def checkpoint(self, stage: str, name: str = "best.pt") -> Path:
        """A stage's checkpoint file, which must exist."""
        path = self.stage_dir(stage) / name
        if not path.is_file():
            raise RunDirError(f"no checkpoint of stage {stage!r} at {path} (was that stage trained?)")
        return path

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run; error naming the path if it or its config is missing."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"run directory not found: {path}")
        run = cls(path)
        if not run.config_path.is_file():
            raise RunDirError(f"not a run directory (no {CONFIG_FILE}): {path}")
        return run

    def trained_classes(self) -> list[str] | None:
        """The class names of the models' outputs, in order (None for a run made before
        classes.json was written)."""
        path = self.path / CLASSES_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def check_classes(self, names: list[str], source: str) -> None:
        """`names` (read from `source`) must be the run's classes in the run's order: another
        order would put each probability under the wrong class name."""
        recorded = self.trained_classes()
        if recorded is not None and list(names) != recorded:
            raise DataError(
                f"{source} gives the classes as {list(names)}, but the run {self.path} was "
                f"trained with {recorded} ({CLASSES_FILE}): the outputs would be mislabeled. "
                f"Use the label map the run was trained with.")

    def record_classes(self, names: list[str], source: str) -> None:
        """Write classes.json at the first start; later starts must agree with it."""
        from .checkpoint import atomic_write_text

        self.check_classes(names, source)
        if self.trained_classes() is None:
            atomic_write_text(json.dumps(list(names), indent=1), self.path / CLASSES_FILE)

    def load_config(self) -> Config:
        try:
            return from_dict(Config, read_run_config(self.config_path))
        except ConfigError as err:
            raise ConfigError(f"{self.config_path}: {err}") from None

    @classmethod
    def create(cls, config: Config, path: str | Path | None = None) -> "RunDir":
        """A new run directory holding `config`: `path`, or <out_dir>/<name>-<timestamp>."""
        explicit = path is not None
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(config.out_dir) / f"{config.name}-{stamp}"
            suffix = 1
            while path.exists():  # two runs started within the same second
                suffix += 1
                path = Path(config.out_dir) / f"{config.name}-{stamp}-{suffix}"
        path = Path(path)
        if (path / CONFIG_FILE).exists():
            raise RunDirError(f"{path} already holds a run; continue it with --resume {path}")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileNotFoundError, NotADirectoryError) as err:  # under a file, /proc, ...
            given = "--run-dir" if explicit else "out_dir"
            raise type(err)(err.errno, f"{given}: cannot create the run directory "
                                       f"({err.strerror})", str(path)) from None
        run = cls(path, created)
        save_config(config, run.config_path)
        return run

    @contextmanager
    def training_lock(self):
        """Hold the run for this process: a second `ei train --resume` of the same run fails
        at once instead of overwriting this one's checkpoints. An flock, so the kernel
        releases it when the process ends, however it ends (kill -9 included)."""
        import fcntl

        f = open(self.path / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"{self.path} is being trained right now by {holder}; wait for "
                              f"it to finish or stop it, then resume") from None
        try:
            f.truncate(0)
            f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield
        finally:
            f.close()

    def trainer(self) -> str | None:
        """Who holds training_lock right now ("process N on HOST"), or None. Read-only: a
        run someone else wrote, or on a read-only disk, can be asked too."""
        import fcntl

        try:
            f = open(self.path / LOCK_FILE, encoding="utf-8")
        except OSError:
            return None  # never trained here, or unreadable: nobody we could name
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def discard_if_untrained(self) -> bool:
        """After a failed start: remove what this program wrote if no epoch was trained (only
        config.yaml, classes.json, the lock and empty folders), so that the same command can
        be run again once the cause is fixed. Returns whether it removed the run."""
        files = [p for p in self.path.rglob("*") if not p.is_dir()]
        if any(p.parent != self.path or p.name not in _START_FILES for p in files):
            return False
        for p in files:
            p.unlink()
        for d in sorted((p for p in self.path.rglob("*") if p.is_dir()), reverse=True):
            d.rmdir()
        if self.created:
            self.path.rmdir()
        return True
