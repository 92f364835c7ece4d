"""An independent, unfused MoR reference for the tests: one shrink, expand and softmax per
branch and group, exactly as the formula reads (docs/MOR_MATH.md), with nothing shared with the
package's code paths."""

from __future__ import annotations

import torch


def reference_mor(x, weight, bias, lora_a, lora_b, router_weight, router_bias, *, ranks,
                  scalings, bypass=True, groups=1):
    out_features = weight.shape[0]
    og, r = out_features // groups, sum(ranks)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    per_group = []
    for g in range(groups):
        a_g, b_g = lora_a[g * r:(g + 1) * r], lora_b[g * og:(g + 1) * og]
        if router_weight is not None:
            n_logits = len(ranks) + int(bypass)
            rows = slice(g * n_logits, (g + 1) * n_logits)
            logits = x @ router_weight[rows].t()
            if router_bias is not None:
                logits = logits + router_bias[rows]
            p = torch.softmax(logits, dim=-1)
            weights = [p[..., k + int(bypass)] for k in range(len(ranks))]
        else:
            weights = [1.0] * len(ranks)
        lora, start = 0, 0
        for k, (rank, s) in enumerate(zip(ranks, scalings)):
            a_k, b_k = a_g[start:start + rank], b_g[:, start:start + rank]
            w = weights[k] if isinstance(weights[k], float) else weights[k].unsqueeze(-1)
            lora = lora + w * s * ((x @ a_k.t()) @ b_k.t())
            start += rank
        per_group.append(lora)
    return y + torch.cat(per_group, dim=-1)


def make_inputs(n_lead, in_features, out_features, *, ranks=(2, 4, 8), bypass=True,
                router=True, groups=1, bias=True, dtype=torch.float32, seed=0):
    """Random op inputs with a non-zero lora_b (zeros would hide expand bugs)."""
    gen = torch.Generator().manual_seed(seed)
    r, n_logits = sum(ranks), len(ranks) + int(bypass)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    k = in_features
    return dict(
        x=rnd(*n_lead, k),
        weight=rnd(out_features, k, scale=k ** -0.5),
        bias=rnd(out_features) if bias else None,
        lora_a=rnd(groups * r, k, scale=k ** -0.5),
        lora_b=rnd(out_features, r, scale=0.5),
        router_weight=rnd(groups * n_logits, k, scale=k ** -0.5) if router else None,
        router_bias=rnd(groups * n_logits) if router else None,
    )
