"""The layers the layer benchmark compares, all holding the same weights.

- linear:          a frozen nn.Linear (the floor: MoR can only add to its cost)
- eager:           the authors-style eager MoR layer (the baseline)
- compiled-eager:  torch.compile of the eager layer
- fused-<backend>: FusedMoRLinear with each backend available on the device
"""

from __future__ import annotations

import torch
from torch import nn

from ei_kernels import FusedMoRLinear, available_backends

from .eager_mor import EagerMoRLinear


def layer_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(in_features, out_features, groups, tokens N)."""
    if quick:
        return [(64, 96, 1, 2 * 17), (64, 96, 3, 2 * 17)]
    if device.type == "cpu":
        # ViT-S and ViT-B MLP widths and the ViT-B qkv, N = batch 4 x 197 tokens.
        n = 4 * 197
        return [(384, 1536, 1, n), (1536, 384, 1, n), (768, 3072, 1, n), (3072, 768, 1, n),
                (768, 2304, 3, n)]
    widths = [(768, 768, 1), (768, 2304, 3), (768, 3072, 1), (3072, 768, 1)]
    return [(k, o, g, n) for n in (1576, 12608, 32800) for k, o, g in widths]


def provider_names(device: torch.device) -> list[str]:
    fused = [f"fused-{b}" for b in available_backends(device)
             if not (device.type == "cpu" and b == "triton")]  # the interpreter is no benchmark
    return ["linear", "eager", "compiled-eager", *fused]


def build(provider: str, k: int, o: int, groups: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    fused = FusedMoRLinear(k, o, groups=groups, device=device, dtype=dtype)
    with torch.no_grad():
        fused.lora_b.normal_(0, 0.02)  # non-zero, as after some training
    if provider == "linear":
        linear = nn.Linear(k, o, device=device, dtype=dtype)
        linear.load_state_dict({"weight": fused.weight, "bias": fused.bias})
        return linear.requires_grad_(False)
    if provider.startswith("fused-"):
        fused.backend = provider.removeprefix("fused-")
        return fused
    eager = EagerMoRLinear(k, o, groups=groups, device=device, dtype=dtype)
    eager.load_state_dict(fused.reference_state_dict())
    return torch.compile(eager) if provider == "compiled-eager" else eager


def layer_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str):
    """The timed call: "fwd" without autograd, or "fwd+bwd" with x's gradient (base frozen)."""

    def step():
        if mode == "fwd":
            with torch.no_grad():
                layer(x)
            return
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    return step
