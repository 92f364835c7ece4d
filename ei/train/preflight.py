"""Everything a run needs, checked before its directory is created or any data is read, so
that a mistake costs seconds, not a trained stage: the data files the config names (and, for
the synthetic preset, that generating it destroys nothing), and every stage's model built on
the meta device (no memory, no weights), which catches what only the model knows, such as an
inject_layer past the backbone's last block or a FusedMoRLinear argument it refuses."""

from __future__ import annotations

from pathlib import Path

from ei.data.annotations import load_label_map, read_annotations
from ei.data.presets import get_preset
from ei.data.synthetic import check_synthetic_root

from .config import Config, ConfigError

# The model layer's errors start with the field of its own dataclasses; the config key of each.
_MODEL_KEYS = {
    "inject_layer": "model.inject_layer", "int_position": "model.int_position",
    "adapter_hidden": "model.adapter_hidden", "name": "model.backbone",
    "timm_kwargs": "model.timm_kwargs", "targets": "model.mor.targets",
    "ranks": "model.mor.ranks", "alphas": "model.mor.alphas", "backend": "model.mor.backend",
}


def check_data_files(config: Config) -> None:
    """The data the config names is there (no torch needed: runs before the heavy imports)."""
    data = config.data
    if data.preset == "synthetic":
        check_synthetic_root(data.root)
        return
    root = Path(data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: no directory at {root}")
    where, base = (root, "data.root") if data.splits is None else (Path(data.splits), "data.splits")
    if not where.is_dir():
        raise ConfigError(f"data.splits: no directory at {where}")
    named = {"data.labels": data.labels, "data.train": data.train, "data.val": data.val,
             "data.test": data.test}
    for key, name in named.items():
        if name is not None and not (where / name).is_file():
            raise ConfigError(f"{key}: no file {where / name} (paths are relative to {base})")
    # Every annotation line parses with the label map (image files are opened later, with the
    # datasets): a bad line fails now, naming file and line.
    preset = get_preset(data.preset)
    labels = (load_label_map(where / data.labels) if data.labels
              else {name: i for i, name in enumerate(preset.classes)})
    for name in (data.train, data.val, data.test):
        read_annotations(where / name, labels, preset.modalities, preset.multi_label)


def check_models(config: Config) -> None:
    """Build each stage's model on the meta device; its errors become config errors. A
    model.checkpoint is read and loaded into a meta backbone too: a file of another model is
    then refused before the run starts (timm's own weights are not fetched here)."""
    import torch

    from .data import resolve_preset
    from .models import build_model, stage_names

    preset = resolve_preset(config)
    for stage in stage_names(config, preset):
        try:
            with torch.device("meta"):
                build_model(config, preset, stage, with_weights=False)
        except (ValueError, TypeError, KeyError, AssertionError) as err:  # timm asserts too
            text = _message(err)
            field, _, rest = text.partition(":")
            key = _MODEL_KEYS.get(field.strip())
            raise ConfigError(f"{key}:{rest}" if key else f"model ({stage}): {text}") from None
    if config.model.checkpoint is not None:  # (the model itself is sound by now)
        _check_checkpoint(config, preset)


def _message(err: Exception) -> str:
    # a KeyError's str() is its message quoted
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


def _check_checkpoint(config: Config, preset) -> None:
    import dataclasses
    import warnings

    import torch

    from ei.model import SingleModalityModel

    from .models import backbone_config

    backbone = dataclasses.replace(backbone_config(config, with_weights=False),
                                   checkpoint=config.model.checkpoint)
    try:
        # (loading real tensors into meta ones only compares shapes: torch warns it copies none)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            SingleModalityModel.build(backbone, preset.num_classes)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ConfigError(f"model.checkpoint: {_message(err)}") from None
