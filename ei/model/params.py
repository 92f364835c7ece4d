"""Parameter report: trainable parameters per part of a single-modality or EI model."""

from __future__ import annotations

from torch import nn

from ei_kernels import FusedMoRLinear

PARTS = ("mor", "adapters", "heads", "gate", "other")


def _part(name: str, mor_prefixes: tuple[str, ...]) -> str:
    if name.startswith(mor_prefixes):
        return "mor"
    top = name.split(".", 1)[0]
    if top in ("adapters", "gate"):
        return top
    if top == "heads" or ".classifier." in f".{name}":
        return "heads"
    return "other"


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Trainable elements per part (MoR branches and routers, [INT] adapters, classifiers,
    gate, anything else), their "trainable" sum, and the "frozen" count; shared tensors once."""
    mor_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, FusedMoRLinear))
    report = dict.fromkeys(PARTS, 0)
    report.update(trainable=0, frozen=0)
    for name, p in model.named_parameters():  # named_parameters already skips shared tensors
        if not p.requires_grad:
            report["frozen"] += p.numel()
            continue
        report[_part(name, mor_prefixes)] += p.numel()
        report["trainable"] += p.numel()
    return report


def format_parameter_report(report: dict[str, int]) -> str:
    return "\n".join(f"{k:>10}: {v:>12,}" for k, v in report.items())
