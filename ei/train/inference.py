"""Scores of a model on a loader, gathered from every rank: what validation, evaluation and
prediction all compute."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ei.metrics import compute_metrics

from .distributed import World, all_gather_objects
from .tasks import probabilities, to_device


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 autocast on GPUs with bf16 tensor cores (sm_80 and newer: A100, A10, RTX
    30xx/40xx, H100), fp16 with the gradient scaler on older ones (T4, V100: bf16 there is
    emulated, and Triton's tensor-core dots have none), fp32 on the CPU. fp16 asked for on the
    CPU runs too (slowly), with the same gradient scaler: what tests the fp16 path without a GPU."""
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    return requested


@torch.no_grad()
def collect_scores(model: nn.Module, task, loader: DataLoader, world: World, precision: str,
                   progress=None, as_probabilities: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (N, K), targets, sample indices), sorted by index, over the whole dataset.
    Scores are what the task's metrics rank (its protocol.scoring), or probabilities."""
    model.eval()
    scores, targets, indices = [], [], []
    for batch in loader:
        batch = to_device(batch, world.device)
        with autocast(world.device, precision):
            logits = task.logits(model, batch)
        if as_probabilities:
            scores.append(probabilities(logits, task.multi_label).cpu())
        else:
            scores.append(task.scores(logits).cpu())
        targets.append(batch["label"].cpu())
        indices.append(batch["index"].cpu())
        if progress is not None:
            progress.update(len(batch["index"]))
    local = (torch.cat(scores).numpy(), torch.cat(targets).numpy(), torch.cat(indices).numpy())
    parts = all_gather_objects(local, world)
    s, t, i = (np.concatenate([p[k] for p in parts]) for k in range(3))
    # A padded shard repeats samples: keep the first copy of each index.
    i, first = np.unique(i, return_index=True)
    return s[first], t[first], i


def loader_metrics(model: nn.Module, task, loader: DataLoader, world: World, precision: str,
                   class_names, progress=None) -> dict:
    """ei.metrics of `model` on every sample of `loader`, scored as the task says."""
    scores, targets, _ = collect_scores(model, task, loader, world, precision, progress)
    return compute_metrics(targets, scores, task.multi_label, class_names, task.threshold)
