"""The EI loss (docs/EI_SPEC.md, Losses):

    L = w_f CE(fused) + w_p sum_t CE(y_t) + w_aa sum_t CE(stage1_t)
      + w_ag NLL(log(alpha + eps), best)

best = argmin_t CE(y_t, label) * prior_t per sample, without gradient; prior_t = 1 except
`prior_low` for the modality that was best on the training set. Multi-label data use BCE
(per sample: the mean over classes); with ``gate_target="cross_entropy"`` (the authors' code)
the ranking of `best` uses cross-entropy against the multi-hot target instead, which is 0 for
every modality of a sample without positive labels, so such a sample always picks modality 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ei_model import EIOutput


@dataclass
class EILossConfig:
    multi_label: bool = False
    fused_weight: float = 1.0
    main_weight: float = 1.0
    aux_weight: float = 0.3
    gate_weight: float = 0.1
    use_aux: bool = True   # L_aa: supervise the stage-1 logits
    use_gate: bool = True  # L_ag: supervise alpha with the best modality
    best_modality: Optional[str] = None  # best single modality on the training set
    prior_low: float = 1e-3
    eps: float = 1e-8
    gate_target: str = "task_loss"  # or "cross_entropy": how `best` ranks the modalities

    def __post_init__(self) -> None:
        if self.gate_target not in ("task_loss", "cross_entropy"):
            raise ValueError(f"gate_target: expected 'task_loss' or 'cross_entropy', "
                             f"got {self.gate_target!r}")


def per_sample_loss(logits: Tensor, target: Tensor, multi_label: bool) -> Tensor:
    """(B,) cross-entropy (target: class indices (B,)) or BCE averaged over classes
    (target: multi-hot (B, C))."""
    if multi_label:
        if target.shape != logits.shape:
            raise ValueError(f"target: multi-label needs shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        return F.binary_cross_entropy_with_logits(
            logits.float(), target.float(), reduction="none").mean(dim=1)
    if target.shape != logits.shape[:1] or target.is_floating_point():
        raise ValueError(f"target: single-label needs class indices of shape ({logits.shape[0]},), "
                         f"got {target.dtype} {tuple(target.shape)}")
    return F.cross_entropy(logits.float(), target, reduction="none")


def modality_prior(modalities: Sequence[str], best: Optional[str], low: float = 1e-3) -> Tensor:
    """(M,) prior: 1 for every modality, `low` for `best` (all ones when best is None)."""
    prior = torch.ones(len(modalities))
    if best is not None:
        if best not in modalities:
            raise KeyError(f"best_modality: {best!r} is not one of {list(modalities)}")
        prior[list(modalities).index(best)] = low
    return prior


def ei_loss(output: EIOutput, target: Tensor, config: Optional[EILossConfig] = None
            ) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, terms): terms holds each unweighted term, detached: "fused", "main", "aux",
    "gate" (the last two only when enabled) and the per-modality "main/<m>", "aux/<m>"."""
    config = config or EILossConfig()
    mods = list(output.stage2)
    ml = config.multi_label
    # (B, M) per-sample losses of the stage-2 logits
    main = torch.stack([per_sample_loss(output.stage2[m], target, ml) for m in mods], dim=1)
    terms = {"fused": per_sample_loss(output.fused, target, ml).mean(), "main": main.mean(0).sum()}
    total = config.fused_weight * terms["fused"] + config.main_weight * terms["main"]
    per_modality = {f"main/{m}": main[:, k].mean() for k, m in enumerate(mods)}
    if config.use_aux:
        aux = torch.stack([per_sample_loss(output.stage1[m], target, ml) for m in mods], dim=1)
        terms["aux"] = aux.mean(0).sum()
        total = total + config.aux_weight * terms["aux"]
        per_modality.update({f"aux/{m}": aux[:, k].mean() for k, m in enumerate(mods)})
    if config.use_gate:
        prior = modality_prior(mods, config.best_modality, config.prior_low).to(main.device)
        rank = main.detach()
        if ml and config.gate_target == "cross_entropy":
            rank = torch.stack([F.cross_entropy(output.stage2[m].detach().float(), target.float(),
                                                reduction="none") for m in mods], dim=1)
        best = (rank * prior).argmin(dim=1)
        terms["gate"] = F.nll_loss(torch.log(output.alpha.float() + config.eps), best)
        total = total + config.gate_weight * terms["gate"]
    terms.update(per_modality)
    return total, {k: v.detach() for k, v in terms.items()}
