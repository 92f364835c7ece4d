"""Training of EI: configuration, schedule, checkpoints, the stage loop, the two-stage
pipeline and several processes through torchrun."""

from .config import Config, ConfigError, load_config
from .pipeline import format_summary, train_all
from .rundir import RunDir, RunDirError

__all__ = ["Config", "ConfigError", "load_config", "format_summary", "train_all", "RunDir",
           "RunDirError"]
