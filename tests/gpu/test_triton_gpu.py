"""The Triton backend on a CUDA GPU (run by scripts/gpu_check.sh): ViT-B sizes in fp32, bf16 and
fp16 against the torch backend and fp64, deterministic and atomic reductions, CUDA graph capture
and replay, torch.compile(fullgraph=True) of FusedMoRLinear(backend="triton")."""

import pytest
import torch

from ei_kernels import FusedMoRLinear, mor_linear_with_routing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RANKS, SCALINGS = (2, 4, 8), (2.0, 1.0, 0.5)  # distinct scalings catch a mis-weighted column
GRADS = ("x", "lora_a", "lora_b", "router_weight", "router_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (tokens, K, O, config, dtype): ViT-B layers (1576 tokens = batch 8, 12608 = batch 64) and an
# odd shape whose every dimension ends in a partial tile. Every flag variant also runs under the
# interpreter; here each case is a new compilation, so the list stays short.
CASES = [
    pytest.param(1576, 768, 768, {}, "fp32", id="default-fp32"),
    pytest.param(1576, 768, 768, {}, "bf16", id="default-bf16"),
    pytest.param(1576, 768, 768, {}, "fp16", id="default-fp16"),
    pytest.param(1576, 768, 2304, {"groups": 3}, "bf16", id="qkv-groups3-bf16"),
    pytest.param(1576, 768, 768, {"bypass": False}, "bf16", id="no-bypass-bf16"),
    pytest.param(1576, 768, 768, {"router": False}, "bf16", id="plain-lora-bf16"),
    pytest.param(1576, 768, 768, {"non_contiguous": True}, "fp16", id="non-contiguous-fp16"),
    pytest.param(12608, 768, 3072, {}, "bf16", id="mlp-fc1-12608-bf16"),
    pytest.param(12608, 3072, 768, {}, "fp32", id="mlp-fc2-12608-fp32"),
    pytest.param(333, 100, 120, {"groups": 3}, "bf16", id="odd-groups3-bf16"),
]


def _make(n, k, o, cfg, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    G = cfg.get("groups", 1)
    router, bypass = cfg.get("router", True), cfg.get("bypass", True)
    r, L = sum(RANKS), (len(RANKS) + bypass) if router else 0

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * scale
        return t.to(dtype)

    inputs = dict(
        x=rnd(n, k),
        weight=rnd(o, k, scale=k ** -0.5),
        bias=rnd(o) if cfg.get("bias", True) else None,
        lora_a=rnd(G * r, k, scale=k ** -0.5),
        lora_b=rnd(o, r, scale=0.5),
        router_weight=rnd(G * L, k, scale=2 * k ** -0.5) if router else None,
        router_bias=rnd(G * L) if router else None,
    )
    return inputs, rnd(n, o)


def _run(backend, inputs, dy, cfg, dtype=None):
    leaves = {}
    for name, v in inputs.items():
        if v is not None:
            v = v.detach().to(dtype or v.dtype)
            if cfg.get("non_contiguous") and name in ("x", "weight"):
                v = v.t().contiguous().t()  # column-major
            v.requires_grad_(name in GRADS)
        leaves[name] = v
    y, probs = mor_linear_with_routing(
        *leaves.values(), ranks=RANKS, scalings=SCALINGS, bypass=cfg.get("bypass", True),
        groups=cfg.get("groups", 1), backend=backend,
    )
    dy = dy.to(y.dtype)
    y.backward(dy.t().contiguous().t() if cfg.get("non_contiguous") else dy)
    return y.detach(), probs, {n: leaves[n].grad for n in GRADS if leaves[n] is not None}


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(name, ours, torch_out, exact):
    assert ours.shape == exact.shape and ours.dtype == torch_out.dtype, name
    assert torch.isfinite(ours).all(), name
    scale = exact.abs().max().item() if exact.numel() else 0.0
    limit = 2 * _err(torch_out, exact) + torch.finfo(torch_out.dtype).eps * scale
    assert _err(ours, exact) <= limit, f"{name}: err {_err(ours, exact):.3g} > {limit:.3g}"


@pytest.fixture
def poisoned(monkeypatch):
    from ei_kernels.ops import triton_mor

    monkeypatch.setattr(triton_mor, "POISON_OUTPUTS", True)
    return triton_mor


@pytest.mark.parametrize("n, k, o, cfg, dtype", CASES)
def test_forward_and_grads_match_torch_and_fp64(poisoned, n, k, o, cfg, dtype):
    inputs, dy = _make(n, k, o, cfg, DTYPES[dtype])
    y, probs, grads = _run("triton", inputs, dy, cfg)
    y_t, probs_t, grads_t = _run("torch", inputs, dy, cfg)
    y_x, probs_x, grads_x = _run("torch", inputs, dy, cfg, dtype=torch.float64)
    _check("y", y, y_t, y_x)
    _check("probs", probs, probs_t, probs_x)
    assert grads.keys() == grads_t.keys()
    for name in grads:
        _check(name, grads[name], grads_t[name], grads_x[name])


def _backward_outputs(n=1576, k=768, o=2304, cfg=None, dtype=torch.bfloat16):
    cfg = cfg or {"groups": 3}
    inputs, dy = _make(n, k, o, cfg, dtype, seed=1)
    _, _, grads = _run("triton", inputs, dy, cfg)
    return grads


def test_deterministic_mode_is_bitwise_reproducible():
    first, second = _backward_outputs(), _backward_outputs()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_atomic_mode_matches_deterministic(monkeypatch):
    from ei_kernels.ops import triton_mor

    deterministic = _backward_outputs(dtype=torch.float32)
    monkeypatch.setattr(triton_mor, "DETERMINISTIC", False)
    atomic = _backward_outputs(dtype=torch.float32)
    for name in deterministic:
        torch.testing.assert_close(atomic[name], deterministic[name], rtol=1e-4, atol=1e-4)


def _layer(dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    layer = FusedMoRLinear(768, 768, backend="triton", device="cuda", dtype=dtype, **kw)
    torch.nn.init.normal_(layer.lora_b, std=0.1)  # zeros would hide the expand
    return layer


def _fwd_bwd(layer, x, dy):
    """y and every gradient of one forward + backward (gradients reset first)."""
    for p in (x, *layer.parameters()):
        p.grad = None
    y = layer(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


def test_cuda_graph_capture_and_replay():
    layer = _layer()
    x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
        for _ in range(2):
            _fwd_bwd(layer, x, dy)
    torch.cuda.current_stream().wait_stream(side)

    for p in (x, *layer.parameters()):
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(dy)
    static = [y, x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in static]
    eager = _fwd_bwd(layer, x.detach().clone().requires_grad_(), dy)
    for a, b in zip(replayed, eager):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_forward_and_backward():
    layer = _layer()
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    compiled = torch.compile(layer, fullgraph=True)
    got = _fwd_bwd(compiled, x.clone().requires_grad_(), dy)
    want = _fwd_bwd(layer, x.clone().requires_grad_(), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
