"""Training of EI: configuration, schedule, checkpoints, the stage loop, the two-stage
pipeline and several processes through torchrun. Names are imported from their submodules on
first use (ei/lazy.py), so that reading a config does not wait for torch."""

from ei.lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(__name__, {
    "config": ("Config", "ConfigError", "load_config"),
    "pipeline": ("format_summary", "train_all"),
    "rundir": ("RunDir", "RunDirError"),
})
