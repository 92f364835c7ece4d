"""What a stage trains: the loss of a batch and the logits its metrics are computed on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ei.model import EILossConfig, ei_loss
from ei.model.loss import per_sample_loss


def probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """Scores for ei.metrics: sigmoid per class (multi-label) or softmax over classes."""
    logits = logits.float()
    return logits.sigmoid() if multi_label else logits.softmax(dim=-1)


class SingleTask:
    """Stage one: a single-modality model on one modality's images."""

    def __init__(self, modality: str, multi_label: bool) -> None:
        self.modality, self.multi_label = modality, multi_label

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss = per_sample_loss(model(batch[self.modality]), batch["label"], self.multi_label).mean()
        return loss, {}

    def logits(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch[self.modality])


class EITask:
    """Stage two: EI (or late fusion); metrics use the fused logits."""

    def __init__(self, loss_config: EILossConfig) -> None:
        self.loss_config = loss_config
        self.multi_label = loss_config.multi_label

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return ei_loss(model(batch), batch["label"], self.loss_config)

    def logits(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch).fused


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in batch.items()}
