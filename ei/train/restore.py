"""Rebuild a trained stage's model from a run directory, for evaluate, predict and attention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ei.data import Preset
from ei.model import load_strict

from . import checkpoint
from .config import Config, ConfigError
from .data import resolve_preset
from .distributed import World, pick_device
from .models import build_model, build_task, stage_names
from .rundir import RunDir


@dataclass
class Restored:
    run: RunDir
    config: Config
    preset: Preset
    stage: str
    model: nn.Module
    task: object
    world: World


def trained_stages(run: RunDir, config: Config, preset: Preset) -> list[str]:
    return [s for s in stage_names(config, preset) if (run.stage_dir(s) / "best.pt").is_file()]


def restore(run_path, stage: str, device: str = "auto") -> Restored:
    """The best checkpoint of `stage` in the run at `run_path`, on `device`, in eval mode."""
    world = World(device=pick_device(device, 0, "--device"))
    run = RunDir.open(run_path)
    config = run.load_config()
    preset = resolve_preset(config)
    known = stage_names(config, preset)
    if stage not in known:
        raise ConfigError(f"stage: {stage!r} is not a stage of this run; its stages: {', '.join(known)}")
    path = run.checkpoint(stage)
    # Weights come from the checkpoint: no pretrained download, no backbone file needed.
    model = build_model(config, preset, stage, with_weights=False)
    state = checkpoint.load(path, f"{stage} checkpoint")
    try:
        load_strict(model, state, f"{stage} checkpoint {path}")
    except (KeyError, ValueError, TypeError) as err:  # another run's or another model's file
        raise ConfigError(f"{err.args[0] if err.args else err} (not this run's checkpoint?)") \
            from None
    broken = [name for name, value in state.items()
              if value.is_floating_point() and not bool(value.isfinite().all())]
    if broken:  # a diverged run's weights: every score from them would be nan
        raise ConfigError(f"{stage} checkpoint {path}: {len(broken)} tensors hold nan or inf "
                          f"(first: {broken[0]}); the run diverged, nothing to evaluate")
    model.to(world.device).eval()
    return Restored(run, config, preset, stage, model, build_task(config, preset, stage), world)
