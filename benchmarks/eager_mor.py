"""The baseline: an MoR layer written the way the authors' eager code computes it.

Each branch runs its own shrink and expand, materialises an N x O output, the outputs are
stacked and weighted by the router, and autograd keeps all of it for backward. Written here from
the formula (docs/MOR_MATH.md), only to be measured against; it is not part of the package.
Parameter names follow the authors' layout, so `FusedMoRLinear.reference_state_dict()` loads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ei_kernels import FusedMoRLinear


class EagerMoRBranches(nn.Module):
    """sum_k p_k s_k B_k(A_k x) with p = softmax(route(x)), every branch materialised."""

    def __init__(self, in_features, out_features, *, ranks=(2, 4, 8), alphas=(4, 8, 16),
                 bypass=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.lora_as = nn.ModuleList(nn.Linear(in_features, r, False, **factory) for r in ranks)
        self.lora_bs = nn.ModuleList(nn.Linear(r, out_features, False, **factory) for r in ranks)
        self.route = nn.Linear(in_features, len(ranks) + int(bypass), **factory)
        self.scalings = [a / r for a, r in zip(alphas, ranks)]
        self.bypass = bypass
        for a in self.lora_as:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in self.lora_bs:
            nn.init.zeros_(b.weight)

    def forward(self, x):
        p = torch.softmax(self.route(x), dim=-1)
        weights = p[..., 1:] if self.bypass else p
        outs = torch.stack(
            [s * b(a(x)) for a, b, s in zip(self.lora_as, self.lora_bs, self.scalings)], dim=-1
        )
        return (outs * weights.unsqueeze(-2)).sum(-1)


class EagerMoRLinear(nn.Module):
    """Frozen nn.Linear plus eager MoR branches; groups=3 gives the authors' qkv variant
    (keys lora_as_q / route_q / ... per slice, outputs concatenated)."""

    def __init__(self, in_features, out_features, bias=True, *, groups=1, device=None,
                 dtype=None, **config):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear = nn.Linear(in_features, out_features, bias, **factory)
        self.linear.requires_grad_(False)
        self.suffixes = [""] if groups == 1 else ["_q", "_k", "_v"]
        if groups not in (1, 3):
            raise ValueError(f"groups: the eager baseline has groups 1 or 3, got {groups}")
        # A plain list (not registered) so that the state-dict keys are the authors' flat ones;
        # the children themselves are registered under their suffixed names below.
        self.branch_groups = []
        for suffix in self.suffixes:
            branches = EagerMoRBranches(in_features, out_features // groups, **factory, **config)
            for name, child in branches.named_children():
                self.add_module(name + suffix, child)
            self.branch_groups.append(branches)

    def forward(self, x):
        lora = [branches(x) for branches in self.branch_groups]
        return self.linear(x) + (lora[0] if len(lora) == 1 else torch.cat(lora, dim=-1))


def to_eager(model: torch.nn.Module) -> None:
    """Swap every FusedMoRLinear for the authors-style layer holding the same weights."""
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, FusedMoRLinear):
            continue
        spec = layer.spec
        eager = EagerMoRLinear(layer.in_features, layer.out_features, layer.bias is not None,
                               groups=spec.groups, ranks=spec.ranks, alphas=layer.alphas,
                               bypass=spec.bypass, device=layer.weight.device,
                               dtype=layer.weight.dtype)
        eager.load_state_dict(layer.reference_state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, eager)
