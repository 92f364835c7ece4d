"""Weights for the demo's tiny backbone, made on this machine: a stand-in for a pretrained VFM.

EI adapts a frozen *pretrained* backbone. The CPU demo cannot download one, and a frozen
randomly initialised ViT is useless to it: measured on the synthetic data, a linear probe on its
CLS token finds the locator's quadrant at chance, and no model (EI included) got off chance
within 5 minutes. So the demo's backbone is pretrained once, here, on *generic* synthetic scenes
drawn with the same primitives as the dataset but never its images or labels: half are mosaics
with an independent texture in each quadrant (repeats allowed), half a bright disk in one
quadrant on a dark background. Full-parameter AdamW training teaches the CLS token to say, per
quadrant, which texture is there and whether the disk is. That is what a real VFM knows about
real images (what is where), and still nothing about the demo's label, which needs both
modalities combined.

The weights are cached in a file named by a hash of everything that decides them, written
atomically, so later runs (and other torchrun ranks, once rank 0 has made them) load them at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ei.data.synthetic import SIZE, appearance_image, default_root, locator_image
from ei.data.transforms import normalise
from ei.model import ViTBackbone, create_vit

from .checkpoint import atomic_save
from .config import Config, SyntheticPretrainingConfig
from .distributed import World, barrier
from .progress import progress_bar

RECIPE_VERSION = 2
# Mean L2 norm of the CLS features the pretrained backbone hands on (over its pretraining
# scenes); its final LayerNorm is rescaled to it after training. Why: a new linear head moves its
# logits by about lr * |f|^2 per step. At the |f| of about 12 that pretraining leaves, EI's fresh
# classifiers (lr 0.01, momentum 0.95, batch 8) random-walked on labels no single modality
# predicts: their losses rose to 2-3 (chance: 1.39) and EI spent 15 of 40 epochs recovering,
# chance on some seeds (measured). At |f| = 3 they stay at chance until the [INT] tokens carry the
# other modality, and EI learns from epoch 3 on (BENCHMARKS.md).
FEATURE_NORM = 3.0
QUADRANTS = 4
TEXTURES = 4  # the dataset's patterns; index TEXTURES means "no texture" (a disk scene)
TEXTURE_LOGITS = QUADRANTS * (TEXTURES + 1)  # the head's first outputs; then the disk's quadrant


def generic_scenes(count: int, seed: int, noise: float) -> tuple[Tensor, Tensor, Tensor]:
    """`count` normalised images (count, 3, SIZE, SIZE); per-quadrant texture targets
    (count, 4) in 0..TEXTURES; disk quadrant targets (count,) in 0..4 (4: no disk)."""
    rng = np.random.default_rng([seed, 7])  # a stream of its own, apart from the dataset's
    images = np.empty((count, SIZE, SIZE, 3))
    textures = np.full((count, QUADRANTS), TEXTURES)
    disks = np.full(count, QUADRANTS)
    for i in range(count):
        if rng.random() < 0.5:
            textures[i] = rng.integers(TEXTURES, size=QUADRANTS)  # repeats allowed
            images[i] = appearance_image(textures[i], rng)
        else:
            disks[i] = rng.integers(QUADRANTS)
            images[i] = locator_image(int(disks[i]), rng)
    images = np.clip(images + rng.normal(0.0, noise, size=images.shape), 0.0, 1.0)
    # The dataset stores 8-bit PNGs: quantise alike.
    x = normalise(torch.from_numpy(np.round(images * 255) / 255).float().permute(0, 3, 1, 2))
    return x, torch.from_numpy(textures), torch.from_numpy(disks)


def sincos_position_embedding(grid: tuple[int, int], dim: int) -> Tensor:
    """(1, H*W, dim) 2-D sine-cosine embedding: a quarter of the channels per sin/cos of y/x."""
    if dim % 4:
        raise ValueError(f"dim: a 2-D sin-cos embedding needs a multiple of 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    ay, ax = ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)[None]


def pretrain(name: str, timm_kwargs: dict, recipe: SyntheticPretrainingConfig,
             progress: bool = True, device: torch.device = torch.device("cpu")) -> dict:
    """Train a `name` ViT for SIZE px images on generic scenes, on `device`; returns its
    state dict (on the CPU)."""
    torch.manual_seed(recipe.seed)
    vit = create_vit(name, SIZE, **timm_kwargs)
    grid = vit.patch_embed.grid_size
    if (vit.pos_embed is not None and vit.pos_embed.shape[1] == math.prod(grid)
            and vit.embed_dim % 4 == 0):
        # Start from a 2-D sin-cos layout: from timm's 0.02-std init the model spent 12 of 30
        # epochs on a plateau before it placed the disk (measured); from here it needs 2.
        # Not timm's build_sincos2d_pos_embed: it orders the channels [sin y, sin x, cos y,
        # cos x], and the same recipe from that start gave features on which the demo's EI
        # stayed at chance (measured): the demo's table depends on this exact backbone.
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_position_embedding(grid, vit.embed_dim))
    backbone = ViTBackbone(vit, SIZE).to(device)
    head = nn.Linear(vit.embed_dim, TEXTURE_LOGITS + QUADRANTS + 1).to(device)
    scenes = generic_scenes(recipe.images, recipe.seed, recipe.noise)
    images, textures, disks = (t.to(device) for t in scenes)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05)
    steps_per_epoch = recipe.images // recipe.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.1)
    generator = torch.Generator().manual_seed(recipe.seed)
    bar = progress_bar(recipe.epochs * steps_per_epoch, "pretraining the demo backbone", "step",
                       progress)
    for _ in range(recipe.epochs):
        order = torch.randperm(recipe.images, generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size].to(device)
            out = head(backbone(images[idx]))
            texture_logits = out[:, :TEXTURE_LOGITS].reshape(-1, TEXTURES + 1)
            loss = (F.cross_entropy(texture_logits, textures[idx].reshape(-1))
                    + F.cross_entropy(out[:, TEXTURE_LOGITS:], disks[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    with torch.no_grad():
        backbone.eval()
        norm = torch.cat([backbone(images[i : i + 500]) for i in range(0, len(images), 500)]
                         ).norm(dim=1).mean()
        vit.norm.weight.mul_(FEATURE_NORM / norm)
        vit.norm.bias.mul_(FEATURE_NORM / norm)
    return {k: v.cpu() for k, v in vit.state_dict().items()}


def weights_path(name: str, timm_kwargs: dict, recipe: SyntheticPretrainingConfig,
                 root: Path) -> Path:
    key = json.dumps({"version": RECIPE_VERSION, "name": name, "timm_kwargs": timm_kwargs,
                      "size": SIZE, "recipe": asdict(recipe)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return root / f"{name.replace('/', '_')}-{digest}.pt"


def default_weights_root() -> Path:
    """Next to the synthetic dataset: data/pretrained in a checkout (or $EI_SYNTHETIC_DIR/..)."""
    return default_root().parent / "pretrained"


def ensure_demo_backbone(name: str = "tiny", timm_kwargs: dict | None = None,
                         recipe: SyntheticPretrainingConfig | None = None,
                         root: str | Path | None = None,
                         progress: bool = True, device: torch.device = torch.device("cpu")) -> Path:
    """The path of the pretrained weights for this architecture and recipe, made on `device`
    if absent (75 s on a 2-core CPU for the demo's tiny ViT)."""
    timm_kwargs = dict(timm_kwargs or {})
    recipe = recipe or SyntheticPretrainingConfig()
    root = Path(root) if root is not None else default_weights_root()
    path = weights_path(name, timm_kwargs, recipe, root)
    if not path.is_file():
        if progress:
            print(f"pretraining the demo backbone once ({recipe.images} generic scenes, "
                  f"{recipe.epochs} epochs); cached at {path}", flush=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)  # one process: use every core
        try:
            atomic_save(pretrain(name, timm_kwargs, recipe, progress, device), path)
        finally:
            torch.set_num_threads(threads)
    return path


def resolve_demo_backbone(config: Config, world: World) -> Config:
    """`config` with model.synthetic_pretraining replaced by the checkpoint it stands for,
    made first if needed (by rank 0, while the others wait, so no two processes train it)."""
    model = config.model
    if model.synthetic_pretraining is None:
        return config

    def make() -> Path:
        return ensure_demo_backbone(model.backbone, model.timm_kwargs, model.synthetic_pretraining,
                                    progress=world.is_main and config.runtime.progress,
                                    device=world.device)

    if world.is_main:
        path = make()
    barrier(world)
    if not world.is_main:
        path = make()
    resolved = dataclasses.replace(model, synthetic_pretraining=None, checkpoint=str(path))
    return dataclasses.replace(config, model=resolved)
