"""A micro training configuration for the tests of ei.train and the ei command: 16 px images,
a one-block ViT, a few dozen synthetic samples, two epochs per stage (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import yaml

MICRO = {
    "name": "micro",
    "seed": 0,
    "data": {
        "preset": "synthetic",
        "image_size": 16,
        "cache": True,
        "synthetic": {"seed": 0, "n_train": 24, "n_val": 12, "n_test": 12},
    },
    "model": {
        "backbone": "tiny",
        "pretrained": False,
        "timm_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8},
        "adapter_hidden": 16,
    },
    "single": {"epochs": 2, "batch_size": 8, "lr": 0.01},
    "ei": {"epochs": 2, "batch_size": 8, "lr": 0.01},
    # Pinned to the CPU: on a GPU box "auto" would move these runs (and torchrun's ranks, one
    # GPU each) onto CUDA; the GPU paths have their own tests in tests/gpu.
    "runtime": {"threads": 1, "progress": False, "device": "cpu"},
}


def write_micro_config(directory: Path, data_root: Path, **sections) -> Path:
    """micro.yaml in `directory`, with the data under `data_root`; `sections` replace keys of
    top-level sections, e.g. single={"epochs": 3}."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MICRO.items()}
    config["data"]["root"] = str(data_root)
    for section, values in sections.items():
        if isinstance(values, dict):
            config[section] = {**config.get(section, {}), **values}
        else:
            config[section] = values
    path = Path(directory) / "micro.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
