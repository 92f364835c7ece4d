"""``ei attention``: what the main backbone's CLS token attends to in its last block, with and
without the [INT] tokens (as the paper's Fig. 2), drawn over the images.

For each sample, one PNG: a row per modality with the image, the CLS attention over the patches
when the same main backbone runs without [INT] tokens, and with them (the model as trained).
The title of the last panel gives the share of the CLS attention that goes to the [INT] tokens.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ei.data import CLIP_MEAN, CLIP_STD, collate  # noqa: E402
from ei.model.single import flatten_images  # noqa: E402
from ei.train.config import ConfigError  # noqa: E402
from ei.train.data import build_splits  # noqa: E402
from ei.train.restore import restore  # noqa: E402
from ei.train.tasks import probabilities, to_device  # noqa: E402


def cls_patch_attention(attention: torch.Tensor, backbone, num_int: int, prepend: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """From a last-block attention (N, heads, S, S): the head-averaged CLS attention over the
    patch grid (N, gh, gw) and the share that goes to the [INT] tokens (N,)."""
    vit = backbone.vit
    cls = attention[:, :, 0, :].mean(dim=1)  # (N, S)
    prefix = vit.num_prefix_tokens
    gh, gw = vit.patch_embed.grid_size
    start = prefix + (num_int if prepend else 0)
    patches = cls[:, start:start + gh * gw].reshape(-1, gh, gw)
    int_start = prefix if prepend else prefix + gh * gw
    return patches, cls[:, int_start:int_start + num_int].sum(dim=1)


def _upsample(grid: torch.Tensor, backbone) -> torch.Tensor:
    """A patch-grid map upsampled to the padded input and cropped to the image."""
    vit = backbone.vit
    gh, gw = vit.patch_embed.grid_size
    ph, pw = vit.patch_embed.patch_size
    up = F.interpolate(grid[None, None], size=(gh * ph, gw * pw), mode="bilinear",
                       align_corners=False)[0, 0]
    h, w = backbone.input_size
    return up[:h, :w]


def _image(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def attention_maps(model, batch: dict) -> dict:
    """Per modality: CLS patch-attention grids of the first image of each sample without and
    with [INT] tokens, and the [INT] share; plus the fused probabilities."""
    output = model(batch, return_attention=True)
    config = model.config
    prepend = config.int_position == "prepend"
    maps = {}
    for t in config.modalities:
        backbone = model.main[t]
        flat, b, i = flatten_images(batch[t])
        _, plain = backbone(flat, None, return_attention=True)
        without, _ = cls_patch_attention(plain, backbone, 0, prepend)
        num_int = len(config.modalities) - 1
        with_int, share = cls_patch_attention(output.attention[t].flatten(0, 1), backbone,
                                              num_int, prepend)
        first = torch.arange(b) * i  # the first image of each sample
        maps[t] = {"without": without[first], "with": with_int[first], "int_share": share[first]}
    return {"maps": maps, "output": output}


def draw(run_path: str | Path, out_dir: str | Path, split: str = "test", count: int = 8,
         stage: str = "ei", device: str = "auto") -> list[Path]:
    restored = restore(run_path, stage, device)
    model = restored.model
    if getattr(model, "adapters", None) is None:
        raise ConfigError(f"stage: {stage!r} has no [INT] tokens to compare; use an EI stage")
    if count < 1:
        raise ConfigError(f"count: expected at least 1 sample, got {count}")
    splits = build_splits(restored.config, restored.world)
    restored.run.check_classes(splits.class_names, f"the label map of {splits.root}")
    dataset = splits.get(split)
    count = min(count, len(dataset))
    batch = to_device(collate([dataset[i] for i in range(count)]), restored.world.device)
    result = attention_maps(model, batch)
    probs = probabilities(result["output"].fused, restored.task.multi_label).cpu()
    names = splits.class_names
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mods = model.config.modalities
    written = []
    for n in range(count):
        fig, axes = plt.subplots(len(mods), 3, figsize=(10, 3 * len(mods)), squeeze=False,
                                 layout="constrained")
        for row, t in enumerate(mods):
            backbone, maps = model.main[t], result["maps"][t]
            image = _image(batch[t][n, 0])
            panels = [("image", None), ("CLS attention without [INT]", maps["without"][n]),
                      (f"with [INT] ({maps['int_share'][n]:.0%} on [INT])", maps["with"][n])]
            # One colour scale for both maps of a row, so that they compare.
            overlays = [_upsample(g.float().cpu(), backbone).numpy() for _, g in panels[1:]]
            low = min(float(o.min()) for o in overlays)
            high = max(float(o.max()) for o in overlays)
            for col, (title, _) in enumerate(panels):
                ax = axes[row][col]
                ax.imshow(image)
                if col:
                    shown = ax.imshow(overlays[col - 1], cmap="jet", alpha=0.5, vmin=low,
                                      vmax=high)
                ax.set_title(f"{t}: {title}" if col == 0 else title, fontsize=9)
                ax.axis("off")
            bar = fig.colorbar(shown, ax=list(axes[row][1:]), shrink=0.9, pad=0.02)
            bar.set_label("CLS attention per patch", fontsize=8)
            bar.ax.tick_params(labelsize=7)
        label = batch["label"][n].cpu()
        truth = (", ".join(names[k] for k in torch.nonzero(label).flatten()) if label.dim()
                 else names[int(label)])
        fig.suptitle(f"{split} sample {n}: label {truth}; predicted "
                     f"{names[int(probs[n].argmax())]} ({float(probs[n].max()):.2f})", fontsize=10)
        path = out_dir / f"{split}_{n:04d}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written

