"""The "torch" backend: the algebraic fusion of docs/MOR_MATH.md with plain PyTorch ops.

Runs on any device. Instead of E separate LoRA branches it does one shrink matmul
x [A_cat; R]^T, an fp32 softmax, the per-column scaling, and accumulates the rank-r expand
into the base output. Backward needs x, p and u = x A_cat^T: u is kept from the forward when
u and p together fit in SAVED_PER_TOKEN elements per token (one group: r + L = 18 with the
default ranks), and recomputed with a thin matmul otherwise (qkv: 3 * 18). Nothing of size
N x O is ever kept between forward and backward.

Shapes (one group g of G; O_g = O / G):
    x [N, K]   weight [O, K]   lora_a [G*r, K]   lora_b [O, r]   router_weight [G*L, K]
    probs [N, G*L]  with L = E + bypass router outputs per group (0 without a router).
Routing math runs in fp32 (fp64 for fp64 inputs): `acc_dtype`.

Every op here costs a dispatch, and at ViT sizes on a CPU those add up to a visible share of
the layer, so the per-branch bookkeeping is folded into one small matrix S (see
`branch_matrix`) and the thin GEMMs run in the orientation BLAS handles best.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import MoRSpec
from .device_constants import cached


# Activation elements per token autograd may keep beyond x (the memory contract of the op).
SAVED_PER_TOKEN = 32


def keeps_u(spec: MoRSpec) -> bool:
    """Whether `forward(..., keep_u=True)` is within budget: u [N, G*r] shares the storage of
    the shrink output [N, G*(r + L)], which is what stays alive."""
    return spec.groups * (spec.rank + spec.num_logits) <= SAVED_PER_TOKEN


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the router softmax, the probabilities and the token reductions."""
    return torch.promote_types(dtype, torch.float32)


def branch_matrix(spec: MoRSpec, device: torch.device, dtype: torch.dtype) -> Tensor:
    """S [L, r] with S[l, j] = s_k when rank column j belongs to branch k routed by logit l.

    It turns the per-branch bookkeeping into two tiny matmuls: the column coefficients are
    coef = p S ([N, G, r], p_k s_k repeated over branch k's columns), and the gradient of the
    routing weights is dp = (g * u) S^T, whose bypass column is zero (the bypass weights no
    branch). Without a router it is the single row of scalings.
    """

    def build() -> Tensor:
        first = int(spec.bypass)
        s = torch.zeros(max(spec.num_logits, 1), spec.rank, dtype=dtype, device=device)
        for k, (start, end, scaling) in enumerate(spec.branch_spans()):
            s[first + k if spec.router else 0, start:end] = scaling
        return s

    return cached(("torch_branch_matrix", spec, dtype), device, build)


def _shrink_weight(lora_a: Tensor, router_weight: Tensor | None) -> Tensor:
    return lora_a if router_weight is None else torch.cat([lora_a, router_weight])


def _coefficients(probs: Tensor, spec: MoRSpec, n: int, acc: torch.dtype) -> Tensor:
    """[N, G, r] (or [1, 1, r] without a router): p_k(j) * s_k(j) for every rank column j."""
    s = branch_matrix(spec, probs.device, acc)
    if not spec.router:
        return s.view(1, 1, spec.rank)
    return probs.view(n, spec.groups, spec.num_logits) @ s


def forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec: MoRSpec,
            keep_u: bool = False):
    """-> (y, probs), or (y, probs, u) with keep_u, u to be handed back to `backward`."""
    n, G, r, L = x.shape[0], spec.groups, spec.rank, spec.num_logits
    acc = acc_dtype(x.dtype)
    shrink = x @ _shrink_weight(lora_a, router_weight).t()  # [N, G*r + G*L]
    if spec.router:
        logits = shrink[:, G * r :].to(acc)
        if router_bias is not None:
            logits = logits + router_bias.to(acc)
        probs = torch.softmax(logits.view(n, G, L), dim=-1).view(n, G * L)
    else:
        probs = x.new_empty((n, 0), dtype=acc)
    coef = _coefficients(probs, spec, n, acc)
    u = shrink[:, : G * r]
    z = (u.to(acc).view(n, G, r) * coef).to(x.dtype).view(n, G * r)

    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    og = weight.shape[0] // G
    for i in range(G):  # the expand is block-diagonal over the groups
        cols, rows = slice(i * og, (i + 1) * og), slice(i * r, (i + 1) * r)
        y[:, cols].addmm_(z[:, rows], lora_b[cols].t())
    return (y, probs, u) if keep_u else (y, probs)


def backward(dy, x, probs, weight, lora_a, lora_b, router_weight, spec: MoRSpec, compute_dx,
             u=None):
    """u: the one `forward(..., keep_u=True)` returned, or None to recompute it."""
    n, G, r, L = x.shape[0], spec.groups, spec.rank, spec.num_logits
    og = weight.shape[0] // G
    acc = probs.dtype
    u = (x @ lora_a.t() if u is None else u).to(acc).view(n, G, r)
    coef = _coefficients(probs, spec, n, acc)
    z = (u * coef).to(x.dtype).view(n, G * r)

    # g = dy B_cat and dB = dy^T z, per group. Both are thin GEMMs over the wide dy; BLAS runs
    # them faster as r-row products (B^T dy^T and z^T dy) whose results are transposed views.
    g_t = torch.empty((G * r, n), dtype=dy.dtype, device=dy.device)
    d_lora_b_t = torch.empty((G, r, og), dtype=dy.dtype, device=dy.device)
    for i in range(G):
        cols, rows = slice(i * og, (i + 1) * og), slice(i * r, (i + 1) * r)
        torch.mm(lora_b[cols].t(), dy[:, cols].t(), out=g_t[rows])
        torch.mm(z[:, rows].t(), dy[:, cols], out=d_lora_b_t[i])
    d_lora_b = d_lora_b_t.transpose(1, 2).reshape(G * og, r).contiguous()  # [O, r], small
    g = g_t.t().to(acc).view(n, G, r)

    du = (g * coef).view(n, G * r)
    if spec.router:
        dp = (g * u) @ branch_matrix(spec, x.device, acc).t()  # [N, G, L]
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
