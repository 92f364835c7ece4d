"""A run directory: the resolved config (so the run can be rebuilt) and one folder per stage.

    <run>/config.yaml            the complete, resolved configuration
    <run>/single/<modality>/     stage one, per modality
    <run>/ei/  <run>/late_fusion/
    <run>/summary.csv, summary.json
each stage folder holding last.pt, best.pt, metrics.jsonl, curves.png and result.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, load_config, save_config

CONFIG_FILE = "config.yaml"


class RunDirError(FileNotFoundError):
    """A run directory or one of its files is missing, or a new run would overwrite one."""


@dataclass(frozen=True)
class RunDir:
    path: Path

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

    def load_config(self) -> Config:
        try:
            return load_config(self.config_path)
        except ConfigError as err:
            raise ConfigError(f"{self.config_path}: {err}") from None

    @classmethod
    def create(cls, config: Config, path: str | Path | None = None) -> "RunDir":
        """A new run directory holding `config`: `path`, or <out_dir>/<name>-<timestamp>."""
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
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        save_config(config, run.config_path)
        return run
