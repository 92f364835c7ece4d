"""What a stage trains: the loss of a batch and the logits its metrics are computed on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ei.model import EILossConfig, ei_loss
from ei.model.loss import per_sample_loss


def probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """Sigmoid per class (multi-label) or softmax over classes."""
    logits = logits.float()
    return logits.sigmoid() if multi_label else logits.softmax(dim=-1)


class Scoring:
    """What a task's metrics rank (config protocol.scoring): "probabilities", or the raw
    "logits" as the authors' code does. Softmax changes the order of samples within a class, so
    AP and AUC differ; accuracy does not (for multi-label data the 0.5 probability threshold is
    logit 0)."""

    multi_label: bool
    scoring: str

    def scores(self, logits: Tensor) -> Tensor:
        if self.scoring == "logits":
            return logits.float()
        return probabilities(logits, self.multi_label)

    @property
    def threshold(self) -> float:
        return 0.0 if self.scoring == "logits" else 0.5


class SingleTask(Scoring):
    """Stage one: a single-modality model on one modality's images."""

    def __init__(self, modality: str, multi_label: bool, scoring: str = "probabilities") -> None:
        self.modality, self.multi_label, self.scoring = modality, multi_label, scoring

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss = per_sample_loss(model(batch[self.modality]), batch["label"], self.multi_label).mean()
        return loss, {}

    def logits(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch[self.modality])


class EITask(Scoring):
    """Stage two: EI (or late fusion); metrics use the fused logits."""

    def __init__(self, loss_config: EILossConfig, scoring: str = "probabilities") -> None:
        self.loss_config, self.scoring = loss_config, scoring
        self.multi_label = loss_config.multi_label

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return ei_loss(model(batch), batch["label"], self.loss_config)

    def logits(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch).fused


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in batch.items()}
