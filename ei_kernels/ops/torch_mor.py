"""The "torch" backend: the algebraic fusion of MOR_MATH.md with plain PyTorch ops.

Runs on any device. Instead of E separate LoRA branches it does one shrink matmul
x [A_cat; R]^T, an fp32 softmax, the per-column scaling, and accumulates the rank-r expand
into the base output. Backward saves only x and p: u = x A_cat^T is recomputed (a thin matmul)
so that nothing of size N x O or N x r is kept between forward and backward.

Shapes (one group g of G; O_g = O / G):
    x [N, K]   weight [O, K]   lora_a [G*r, K]   lora_b [O, r]   router_weight [G*L, K]
    probs [N, G*L]  with L = E + bypass router outputs per group (0 without a router).
Routing math runs in fp32 (fp64 for fp64 inputs): `acc_dtype`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import MoRSpec


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the router softmax, the probabilities and the token reductions."""
    return torch.promote_types(dtype, torch.float32)


def branch_coefficients(probs: Tensor, spec: MoRSpec, n: int) -> Tensor:
    """fp32 [N, G, r] (or [1, 1, r] without a router): p_k(j) * s_k(j) for every rank column j."""
    spans = spec.branch_spans()
    if not spec.router:
        cols = [torch.full((1, 1, end - start), s, dtype=probs.dtype, device=probs.device) for start, end, s in spans]
        return torch.cat(cols, dim=-1)
    p = probs.view(n, spec.groups, spec.num_logits)
    first = int(spec.bypass)  # the bypass probability p_0 weights no branch
    cols = [
        (p[..., first + k : first + k + 1] * s).expand(n, spec.groups, end - start)
        for k, (start, end, s) in enumerate(spans)
    ]
    return torch.cat(cols, dim=-1)


def _shrink_weight(lora_a: Tensor, router_weight: Tensor | None) -> Tensor:
    return lora_a if router_weight is None else torch.cat([lora_a, router_weight])


def _group_slices(spec: MoRSpec, out_features: int):
    """(output columns, rank columns) of each group: the expand is block-diagonal."""
    og, r = out_features // spec.groups, spec.rank
    return [(slice(g * og, (g + 1) * og), slice(g * r, (g + 1) * r)) for g in range(spec.groups)]


def forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec: MoRSpec):
    n, gr = x.shape[0], spec.groups * spec.rank
    acc = acc_dtype(x.dtype)
    shrink = x @ _shrink_weight(lora_a, router_weight).t()  # [N, G*r + G*L]
    if spec.router:
        logits = shrink[:, gr:].to(acc)
        if router_bias is not None:
            logits = logits + router_bias.to(acc)
        probs = torch.softmax(logits.view(n, spec.groups, spec.num_logits), dim=-1)
        probs = probs.view(n, spec.groups * spec.num_logits)
    else:
        probs = x.new_empty((n, 0), dtype=acc)
    coef = branch_coefficients(probs, spec, n)
    z = (shrink[:, :gr].to(acc).view(n, spec.groups, spec.rank) * coef).to(x.dtype).view(n, gr)

    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    for cols, rcols in _group_slices(spec, weight.shape[0]):
        y[:, cols].addmm_(z[:, rcols], lora_b[cols].t())
    return y, probs


def backward(dy, x, probs, weight, lora_a, lora_b, router_weight, spec: MoRSpec, compute_dx):
    n, G, r, L = x.shape[0], spec.groups, spec.rank, spec.num_logits
    groups = _group_slices(spec, weight.shape[0])
    u = (x @ lora_a.t()).to(probs.dtype).view(n, G, r)
    coef = branch_coefficients(probs, spec, n)
    z = (u * coef).to(x.dtype).view(n, G * r)

    g = torch.empty((n, G * r), dtype=dy.dtype, device=dy.device)  # dy B_cat, per group
    d_lora_b = torch.empty_like(lora_b)
    for cols, rcols in groups:
        torch.mm(dy[:, cols], lora_b[cols], out=g[:, rcols])
        torch.mm(dy[:, cols].t(), z[:, rcols], out=d_lora_b[cols])
    g = g.to(probs.dtype).view(n, G, r)

    du = (g * coef).view(n, G * r)
    if spec.router:
        gu = g * u
        dw = [gu[..., start:end].sum(-1, keepdim=True) * s for start, end, s in spec.branch_spans()]
        if spec.bypass:
            dw.insert(0, torch.zeros_like(dw[0]))
        dp = torch.cat(dw, dim=-1)  # [N, G, L]
        p = probs.view(n, G, L)
        dl = (p * (dp - (p * dp).sum(-1, keepdim=True))).view(n, G * L)
        d_shrink = torch.cat([du, dl], dim=1).to(x.dtype)
        d_router_bias = dl.sum(0).to(x.dtype)
    else:
        d_shrink = du.to(x.dtype)
        d_router_bias = x.new_empty((0,))

    if compute_dx:
        dx = dy @ weight
        dx.addmm_(d_shrink, _shrink_weight(lora_a, router_weight))  # K-extension of the dgrad
    else:
        dx = x.new_empty((0, x.shape[1]))
    d_shrink_weight = d_shrink.t() @ x  # one reduction over x for A_cat and R
    # Op outputs must not alias each other: the small router slice gets its own storage.
    d_lora_a, d_router_weight = d_shrink_weight[: G * r], d_shrink_weight[G * r :].clone()
    return dx, d_lora_a, d_lora_b, d_router_weight, d_router_bias
