"""What the GPU tests of the Triton and CUDA backends share: the input maker, one forward +
backward through the functional op, the error check against the torch backend and fp64, and the
module-level CUDA graph and torch.compile checks."""

import torch

from ei_kernels import FusedMoRLinear, mor_linear_with_routing

RANKS, SCALINGS = (2, 4, 8), (2.0, 1.0, 0.5)  # distinct scalings catch a mis-weighted column
GRADS = ("x", "lora_a", "lora_b", "router_weight", "router_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(n, k, o, cfg, dtype, seed=0):
    """The op's inputs (scaled like a trained layer) and an upstream gradient dy."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    G = cfg.get("groups", 1)
    router, bypass = cfg.get("router", True), cfg.get("bypass", True)
    ranks = cfg.get("ranks", RANKS)
    r, L = sum(ranks), (len(ranks) + bypass) if router else 0

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * scale
        return t.to(dtype)

    fan_in = max(k, 1) ** -0.5  # (k = 0: empty matrices)
    inputs = dict(
        x=rnd(n, k),
        weight=rnd(o, k, scale=fan_in),
        bias=rnd(o) if cfg.get("bias", True) else None,
        lora_a=rnd(G * r, k, scale=fan_in),
        lora_b=rnd(o, r, scale=0.5),
        router_weight=rnd(G * L, k, scale=2 * fan_in) if router else None,
        router_bias=rnd(G * L) if router else None,
    )
    return inputs, rnd(n, o)


def run(backend, inputs, dy, cfg, dtype=None):
    """-> (y, probs, gradients) of one forward + backward; cfg flags: non_contiguous (x, weight
    and dy column-major), no_dx (x needs no gradient), bypass, groups, ranks and scalings
    (default RANKS, SCALINGS)."""
    leaves = {}
    for name, v in inputs.items():
        if v is not None:
            v = v.detach().to(dtype or v.dtype)
            if cfg.get("non_contiguous") and name in ("x", "weight"):
                v = v.t().contiguous().t()  # column-major
            v.requires_grad_(name in GRADS and not (name == "x" and cfg.get("no_dx")))
        leaves[name] = v
    y, probs = mor_linear_with_routing(
        *leaves.values(), ranks=cfg.get("ranks", RANKS), scalings=cfg.get("scalings", SCALINGS),
        bypass=cfg.get("bypass", True),
        groups=cfg.get("groups", 1), backend=backend,
    )
    dy = dy.to(y.dtype)
    y.backward(dy.t().contiguous().t() if cfg.get("non_contiguous") else dy)
    grads = {n: leaves[n].grad for n in GRADS if leaves[n] is not None and leaves[n].requires_grad}
    return y.detach(), probs, grads


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(name, ours, torch_out, exact, ulps):
    """Our error against fp64 is at most twice PyTorch's own at this precision, plus `ulps`
    units of the largest value (the kernels sum in another order than PyTorch)."""
    assert ours.shape == exact.shape and ours.dtype == torch_out.dtype, name
    assert torch.isfinite(ours).all(), name
    scale = exact.abs().max().item() if exact.numel() else 0.0
    limit = 2 * max_error(torch_out, exact) + ulps * torch.finfo(torch_out.dtype).eps * scale
    err = max_error(ours, exact)
    assert err <= limit, f"{name}: err {err:.3g} > {limit:.3g}"


def poison_allocator():
    """Leave NaNs in the caching allocator's free blocks, so that an output element the
    kernels never write shows up as NaN instead of as a stale, possibly correct value."""
    blocks = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]
    blocks.append(torch.full((64 << 20,), float("nan"), device="cuda"))
    del blocks


def check_against_torch_and_fp64(backend, n, k, o, cfg, dtype, ulps):
    inputs, dy = make_inputs(n, k, o, cfg, dtype)
    poison_allocator()
    y, probs, grads = run(backend, inputs, dy, cfg)
    y_t, probs_t, grads_t = run("torch", inputs, dy, cfg)
    y_x, probs_x, grads_x = run("torch", inputs, dy, cfg, dtype=torch.float64)
    check("y", y, y_t, y_x, ulps)
    check("probs", probs, probs_t, probs_x, ulps)
    assert grads.keys() == grads_t.keys()
    for name in grads:
        check(name, grads[name], grads_t[name], grads_x[name], ulps)


def make_layer(backend, dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    layer = FusedMoRLinear(768, 768, backend=backend, device="cuda", dtype=dtype, **kw)
    torch.nn.init.normal_(layer.lora_b, std=0.1)  # zeros would hide the expand
    return layer


def fwd_bwd(layer, x, dy):
    """y and every gradient of one forward + backward (gradients reset first)."""
    for p in (x, *layer.parameters()):
        p.grad = None
    y = layer(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


def check_cuda_graph_replay(layer):
    """Forward + backward captured in a CUDA graph and replayed on new data equals eager."""
    x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation) outside the capture
        for _ in range(2):
            fwd_bwd(layer, x, dy)
    torch.cuda.current_stream().wait_stream(side)

    for p in (x, *layer.parameters()):
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(dy)
    static = [y, x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    # Twice: a replay must not take what an earlier one left (the Triton forward's flags).
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            dy.copy_(torch.randn_like(dy))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in static]
        eager = fwd_bwd(layer, x.detach().clone().requires_grad_(), dy)
        for a, b in zip(replayed, eager):
            assert torch.equal(a, b)


def check_compile_fullgraph(layer):
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    compiled = torch.compile(layer, fullgraph=True)
    got = fwd_bwd(compiled, x.clone().requires_grad_(), dy)
    want = fwd_bwd(layer, x.clone().requires_grad_(), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
