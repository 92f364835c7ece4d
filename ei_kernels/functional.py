"""The functional MoR op: `mor_linear`, registered as a torch.library custom op.

Two custom ops carry the work, `ei_kernels::mor_linear_fwd` and `ei_kernels::mor_linear_bwd`,
each with a fake (meta) implementation, so torch.compile(fullgraph=True) traces a model using
them without a graph break, whichever backend runs inside. Autograd is registered on the
forward op; it saves x and the router probabilities p only (never an N x O tensor).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends
from .checks import check_mor_inputs
from .ops import torch_mor
from .ops.torch_mor import acc_dtype
from .spec import MoRSpec


def _spec(ranks, scalings, bypass, groups, router) -> MoRSpec:
    # Values were validated by MoRSpec.build in mor_linear; rebuilt here from op arguments.
    return MoRSpec(tuple(ranks), tuple(scalings), bypass, router, groups)


def _run_forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, ranks, scalings,
                 bypass, groups, backend):
    spec = _spec(ranks, scalings, bypass, groups, router_weight is not None)
    impl = backends.implementation(backends.resolve(backend, x.device, x.dtype))
    return impl.forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec)


def _run_backward(dy, x, probs, weight, lora_a, lora_b, router_weight, ranks, scalings, bypass,
                  groups, backend, compute_dx, **kept):
    """`kept`: what the forward kept for this backend's backward (torch: u)."""
    spec = _spec(ranks, scalings, bypass, groups, router_weight is not None)
    impl = backends.implementation(backends.resolve(backend, x.device, x.dtype))
    return impl.backward(dy, x, probs, weight, lora_a, lora_b, router_weight, spec, compute_dx,
                         **kept)


@torch.library.custom_op("ei_kernels::mor_linear_fwd", mutates_args=())
def mor_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    router_weight: Optional[Tensor],
    router_bias: Optional[Tensor],
    ranks: List[int],
    scalings: List[float],
    bypass: bool,
    groups: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """x [N, K] -> (y [N, O], probs [N, groups * router outputs] in fp32, fp64 for fp64 x)."""
    return _run_forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, ranks,
                        scalings, bypass, groups, backend)


@mor_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, router_weight, router_bias, ranks, scalings, bypass,
      groups, backend):
    spec = _spec(ranks, scalings, bypass, groups, router_weight is not None)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    probs = x.new_empty((x.shape[0], groups * spec.num_logits), dtype=acc_dtype(x.dtype))
    return y, probs


@torch.library.custom_op("ei_kernels::mor_linear_bwd", mutates_args=())
def mor_linear_bwd(
    dy: Tensor,
    x: Tensor,
    probs: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    router_weight: Optional[Tensor],
    ranks: List[int],
    scalings: List[float],
    bypass: bool,
    groups: int,
    backend: str,
    compute_dx: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx [N, K] or [0, K], d_lora_a, d_lora_b, d_router_weight, d_router_bias).

    Router gradients are 0-row tensors when there is no router; dx is 0-row when not needed.
    """
    return _run_backward(dy, x, probs, weight, lora_a, lora_b, router_weight, ranks, scalings,
                         bypass, groups, backend, compute_dx)


@mor_linear_bwd.register_fake
def _(dy, x, probs, weight, lora_a, lora_b, router_weight, ranks, scalings, bypass, groups,
      backend, compute_dx):
    spec = _spec(ranks, scalings, bypass, groups, router_weight is not None)
    n_logits = groups * spec.num_logits
    return (
        x.new_empty((x.shape[0] if compute_dx else 0, x.shape[1])),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
        x.new_empty((n_logits, x.shape[1])),
        x.new_empty((n_logits,)),
    )


def _save(ctx, x, probs, weight, lora_a, lora_b, router_weight, router_bias, config, u=None):
    ctx.mark_non_differentiable(probs)
    ctx.save_for_backward(x, probs, weight, lora_a, lora_b, router_weight, u)
    ctx.config = config  # (ranks, scalings, bypass, groups, backend)
    ctx.has_router_bias = router_bias is not None


def _input_grads(ctx, dy, run_backward):
    """Gradients of (x, weight, bias, lora_a, lora_b, router_weight, router_bias)."""
    x, probs, weight, lora_a, lora_b, router_weight, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_lora_a, d_lora_b, d_router_weight, d_router_bias = run_backward(
        dy, x, probs, weight, lora_a, lora_b, router_weight, *ctx.config, compute_dx=need[0],
        **({} if u is None else {"u": u}),
    )
    # The base layer is frozen by design; if a caller unfreezes it, its gradients are still
    # exact, computed here with plain PyTorch (they are outside the fused plan).
    d_weight = dy.t() @ x if need[1] else None
    d_bias = dy.sum(0) if need[2] else None
    return (
        dx if need[0] else None,
        d_weight,
        d_bias,
        d_lora_a,
        d_lora_b,
        d_router_weight if router_weight is not None else None,
        d_router_bias if ctx.has_router_bias else None,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, router_weight, router_bias, *config = inputs
    _save(ctx, x, output[1], weight, lora_a, lora_b, router_weight, router_bias, tuple(config))


def _backward(ctx, dy, _dprobs):
    return (*_input_grads(ctx, dy, mor_linear_bwd), None, None, None, None, None)


mor_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerMoRFunction(torch.autograd.Function):
    """Eager autograd for the op: the same backend calls and saved tensors as the custom ops.

    torch.library's generic dispatch and autograd wrapper cost about 1 ms of Python per layer
    step, a few percent of a ViT layer on a CPU; outside torch.compile this path skips them.
    Every backend also keeps u from its forward when it fits the memory contract
    (`torch_mor.keeps_u`) instead of recomputing it. Under torch.compile
    `mor_linear_with_routing` calls the registered custom op instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router_weight, router_bias, *config):
        ranks, scalings, bypass, groups, backend = config
        spec = _spec(ranks, scalings, bypass, groups, router_weight is not None)
        u = None
        if torch_mor.keeps_u(spec):
            impl = backends.implementation(backend)
            y, probs, u = impl.forward(x, weight, bias, lora_a, lora_b, router_weight,
                                       router_bias, spec, keep_u=True)
        else:
            y, probs = _run_forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias,
                                    *config)
        _save(ctx, x, probs, weight, lora_a, lora_b, router_weight, router_bias, config, u)
        return y, probs

    @staticmethod
    def backward(ctx, dy, _dprobs):
        if torch.is_grad_enabled():
            # (autograd enables grad here only for create_graph=True; gradients built from
            # fused kernels would reach a second derivative as constants, a wrong answer)
            raise RuntimeError("mor_linear: create_graph=True (second derivatives, gradient "
                               "penalties) is not supported: its backward is not differentiable")
        return (*_input_grads(ctx, dy, _run_backward), None, None, None, None, None)


def _autocast(tensors: Sequence[Optional[Tensor]], device_type: str) -> list:
    """Cast like nn.Linear does under torch.autocast (custom ops are not autocast by default)."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def mor_linear_with_routing(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    router_weight: Optional[Tensor],
    router_bias: Optional[Tensor],
    *,
    ranks: Sequence[int],
    scalings: Sequence[float],
    bypass: bool = True,
    groups: int = 1,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """`mor_linear` that also returns the router probabilities p, shape (..., groups, L)."""
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {backends.BACKENDS}, got {backend!r}")
    spec = MoRSpec.build(ranks, scalings, bypass=bypass, router=router_weight is not None,
                         groups=groups)
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    x, weight, bias, lora_a, lora_b, router_weight, router_bias = _autocast(
        (x, weight, bias, lora_a, lora_b, router_weight, router_bias), x.device.type
    )
    check_mor_inputs(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec)
    lead = x.shape[:-1]
    args = (x.reshape(math.prod(lead), x.shape[-1]), weight, bias, lora_a, lora_b, router_weight,
            router_bias, list(spec.ranks), list(spec.scalings), spec.bypass, spec.groups)
    if torch.compiler.is_compiling():
        # The backend is chosen when the graph runs (resolving imports modules Dynamo can't trace).
        y, probs = mor_linear_fwd(*args, backend)
    else:
        # Resolved here so that an unavailable backend raises a clear error before any work.
        y, probs = _EagerMoRFunction.apply(*args, backends.resolve(backend, x.device, x.dtype))
    return y.view(*lead, weight.shape[0]), probs.view(*lead, spec.groups, spec.num_logits)


def mor_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    router_weight: Optional[Tensor],
    router_bias: Optional[Tensor],
    *,
    ranks: Sequence[int],
    scalings: Sequence[float],
    bypass: bool = True,
    groups: int = 1,
    backend: str = "auto",
) -> Tensor:
    """y = x W^T + b + sum_k p_k s_k B_k A_k x per token, p = softmax(x R^T + c) (docs/MOR_MATH.md).

    x: (..., K); weight (O, K); bias (O,) or None; lora_a (G*r, K) with the A_k of group g
    stacked in rows [g*r, (g+1)*r); lora_b (O, r) whose rows of output slice g hold
    [B_1 | ... | B_E] of group g; router_weight (G*L, K) and router_bias (G*L,) with
    L = E + bypass, or router_weight=None for plain LoRA (each branch weighted 1).
    """
    y, _ = mor_linear_with_routing(
        x, weight, bias, lora_a, lora_b, router_weight, router_bias,
        ranks=ranks, scalings=scalings, bypass=bypass, groups=groups, backend=backend,
    )
    return y
