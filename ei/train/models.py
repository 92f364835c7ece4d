"""Models and tasks of a run's stages, built from its config through the model layer.

Stages: ``single/<modality>`` (stage one, one per modality), ``ei`` and ``late_fusion``
(stage two: EI with the [INT] tokens, and the baseline without them).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Mapping

from torch import nn

from ei.data import Preset
from ei.model import BackboneConfig, EIConfig, EILossConfig, EIModel, SingleModalityModel
from ei.model.aliases import ALIASES

from .config import Config
from .tasks import EITask, SingleTask

SINGLE_PREFIX = "single/"


def stage_names(config: Config, preset: Preset) -> list[str]:
    names = [SINGLE_PREFIX + m for m in preset.modalities] + ["ei"]
    return names + (["late_fusion"] if config.late_fusion else [])


def stage_seed(seed: int, stage: str) -> int:
    """A seed per stage, stable across processes and Python versions (unlike hash())."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode())) % 2**31


def pos_embed_antialias(config: Config) -> bool:
    """protocol.resampling: always antialiased, or the authors' way: DINOv2 antialiased (its
    hub model interpolates so), any other backbone plain bicubic (their own resize)."""
    timm_name = ALIASES.get(config.model.backbone, (config.model.backbone,))[0]
    return config.protocol.resampling == "antialiased" or "dinov2" in timm_name


def backbone_config(config: Config, with_weights: bool = True) -> BackboneConfig:
    """The backbone of every model of the run. Without weights: random init, for models whose
    weights come from a run's own checkpoint anyway."""
    m = config.model
    return BackboneConfig(
        name=m.backbone, img_size=config.image_size,
        pretrained=m.pretrained and with_weights,
        checkpoint=m.checkpoint if with_weights else None,
        timm_kwargs=dict(m.timm_kwargs), mor=m.mor, grad_checkpointing=m.grad_checkpointing,
        pos_embed_antialias=pos_embed_antialias(config),
    )


def ei_config(config: Config, preset: Preset, stage: str, with_weights: bool = False) -> EIConfig:
    m = config.model
    return EIConfig(
        modalities=preset.modalities, num_classes=preset.num_classes,
        backbone=backbone_config(config, with_weights),
        inject_layer=None if stage == "late_fusion" else m.inject_layer,
        int_position=m.int_position, adapter_hidden=m.adapter_hidden,
    )


def loss_config(config: Config, preset: Preset, best_modality: str | None) -> EILossConfig:
    """`best_modality`: the loss prior's, as chosen by `prior_modality`."""
    fields = {f.name for f in dataclasses.fields(EILossConfig)}
    values = {k: v for k, v in dataclasses.asdict(config.loss).items() if k in fields}
    values["best_modality"] = best_modality
    return EILossConfig(multi_label=preset.multi_label, gate_target=config.protocol.gate_target,
                        **values)


def build_model(config: Config, preset: Preset, stage: str, with_weights: bool = True,
                singles: Mapping[str, str | Path] | None = None) -> nn.Module:
    """A fresh model of `stage`. Stage two models are built from the single-modality
    checkpoints in `singles` when given, else with random weights (to load a checkpoint into)."""
    if stage.startswith(SINGLE_PREFIX):
        return SingleModalityModel.build(backbone_config(config, with_weights), preset.num_classes)
    if stage not in ("ei", "late_fusion"):
        raise ValueError(f"stage: unknown stage {stage!r}")
    if singles is not None:
        return EIModel.from_single(ei_config(config, preset, stage), singles)
    return EIModel(ei_config(config, preset, stage))


def build_task(config: Config, preset: Preset, stage: str, best_modality: str | None = None):
    scoring = config.protocol.scoring
    if stage.startswith(SINGLE_PREFIX):
        return SingleTask(stage[len(SINGLE_PREFIX):], preset.multi_label, scoring)
    return EITask(loss_config(config, preset, best_modality), scoring)
