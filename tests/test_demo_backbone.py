"""ei.train.demo_backbone: the generic pretraining scenes, the cached weights, the config key."""

from __future__ import annotations

import copy

import pytest
import torch

from ei.data.synthetic import SIZE
from ei.model import create_vit
from ei.train import demo_backbone
from ei.train.config import Config, ConfigError, SyntheticPretrainingConfig, from_dict, load_config
from ei.train.demo_backbone import (QUADRANTS, TEXTURES, ensure_demo_backbone, generic_scenes,
                                    resolve_demo_backbone, sincos_position_embedding)
from ei.train.distributed import World

from micro_run import MICRO

ARCH = {"embed_dim": 32, "depth": 1, "num_heads": 2}
QUICK = SyntheticPretrainingConfig(images=16, epochs=1, batch_size=8)


def test_generic_scenes_targets_and_reproducibility():
    x, textures, disks = generic_scenes(40, seed=3, noise=0.1)
    assert x.shape == (40, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert textures.shape == (40, QUADRANTS) and disks.shape == (40,)
    mosaic = disks == QUADRANTS
    # A scene is a texture mosaic (no disk) or a disk scene (no texture), never both.
    assert (textures[mosaic] < TEXTURES).all() and (textures[~mosaic] == TEXTURES).all()
    assert 0 < mosaic.sum() < 40 and (disks[~mosaic] < QUADRANTS).all()
    again = generic_scenes(40, seed=3, noise=0.1)
    assert torch.equal(x, again[0]) and torch.equal(textures, again[1])
    assert not torch.equal(x, generic_scenes(40, seed=4, noise=0.1)[0])


def test_sincos_position_embedding():
    pe = sincos_position_embedding((4, 4), 32)
    assert pe.shape == (1, 16, 32)
    assert len({tuple(row.tolist()) for row in pe[0]}) == 16  # every position distinct
    with pytest.raises(ValueError, match="dim: .*multiple of 4"):
        sincos_position_embedding((4, 4), 30)


def test_weights_cached_and_loadable(tmp_path, monkeypatch):
    path = ensure_demo_backbone("tiny", ARCH, QUICK, root=tmp_path, progress=False)
    vit = create_vit("tiny", SIZE, checkpoint=path, **ARCH)
    fresh = create_vit("tiny", SIZE, **ARCH)
    assert not torch.equal(vit.blocks[0].mlp.fc1.weight, fresh.blocks[0].mlp.fc1.weight)

    def no_training(*args, **kwargs):
        raise AssertionError("cached weights were trained again")

    monkeypatch.setattr(demo_backbone, "pretrain", no_training)
    assert ensure_demo_backbone("tiny", ARCH, QUICK, root=tmp_path, progress=False) == path
    other = SyntheticPretrainingConfig(images=16, epochs=1, batch_size=8, seed=1)
    with pytest.raises(AssertionError, match="trained again"):
        ensure_demo_backbone("tiny", ARCH, other, root=tmp_path, progress=False)


def test_config_key_checked():
    config = copy.deepcopy(MICRO)
    config["model"]["synthetic_pretraining"] = {"images": 16, "batch_size": 8}
    with pytest.raises(ConfigError, match="model.synthetic_pretraining: .*image size"):
        from_dict(Config, config)  # micro images are 16 px, the scenes 32 px
    with pytest.raises(ConfigError, match="model.pretrained: give one source of weights"):
        load_config(None, ["model.backbone=tiny", "model.synthetic_pretraining={}"])
    with pytest.raises(ConfigError,
                       match="model.synthetic_pretraining.batch_size: must be <= images"):
        load_config(None, ["model.pretrained=false", "model.synthetic_pretraining={images: 4}"])


def test_resolve_replaces_the_key_by_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("EI_SYNTHETIC_DIR", str(tmp_path / "synthetic"))
    config = copy.deepcopy(MICRO)
    del config["data"]["image_size"]
    config["model"].update(timm_kwargs=ARCH, synthetic_pretraining=vars(QUICK))
    resolved = resolve_demo_backbone(from_dict(Config, config), World())
    assert resolved.model.synthetic_pretraining is None
    assert resolved.model.checkpoint.startswith(str(tmp_path / "pretrained"))
    plain = from_dict(Config, copy.deepcopy(MICRO))
    assert resolve_demo_backbone(plain, World()) is plain
