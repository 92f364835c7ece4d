"""The functional op `mor_linear` (torch backend) against the independent eager reference."""

import pytest
import torch

from ei_kernels import functional, mor_linear, mor_linear_with_routing
from mor_reference import make_inputs, reference_mor

RANKS, SCALINGS = (2, 4, 8), (2.0, 2.0, 2.0)
GRAD_NAMES = ("x", "lora_a", "lora_b", "router_weight", "router_bias")

# (lead dims of x, K, O, config); ids say what each case is for.
CASES = [
    pytest.param((5,), 16, 12, {}, id="default"),
    pytest.param((7,), 100, 37, {}, id="K100-O37"),
    pytest.param((1,), 24, 10, {}, id="N1"),
    pytest.param((0,), 24, 10, {}, id="N0"),
    pytest.param((2, 3), 24, 10, {}, id="3d"),
    pytest.param((2, 2, 3), 24, 10, {}, id="4d"),
    pytest.param((6,), 40, 36, {"groups": 3}, id="qkv-groups3"),
    pytest.param((6,), 40, 24, {"bypass": False}, id="no-bypass"),
    pytest.param((6,), 40, 24, {"router": False}, id="plain-lora"),
    pytest.param((6,), 40, 36, {"router": False, "groups": 3}, id="plain-lora-groups3"),
    pytest.param((6,), 40, 24, {"bias": False}, id="no-bias"),
    pytest.param((5,), 40, 24, {"ranks": (3,)}, id="one-branch"),
]


def _call(fn, inputs, ranks=RANKS, bypass=True, groups=1, **kw):
    return fn(*inputs.values(), ranks=ranks, scalings=[2.0] * len(ranks), bypass=bypass,
              groups=groups, **kw)


def _grads(fn, inputs, cfg):
    leaves = {k: v.detach().clone().requires_grad_(k in GRAD_NAMES) if v is not None else None
              for k, v in inputs.items()}
    y = _call(fn, leaves, **cfg)
    # A fixed, non-uniform upstream gradient so every output element matters differently.
    dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    y.backward(dy)
    return y.detach(), {k: leaves[k].grad for k in GRAD_NAMES if leaves[k] is not None}


def _split(cfg):
    make_kw = {k: cfg[k] for k in ("ranks", "bypass", "router", "groups", "bias") if k in cfg}
    call_kw = {k: cfg[k] for k in ("ranks", "bypass", "groups") if k in cfg}
    return make_kw, call_kw


@pytest.mark.parametrize("lead, k, o, cfg", CASES)
def test_matches_reference_forward_and_grads(lead, k, o, cfg):
    make_kw, call_kw = _split(cfg)
    inputs = make_inputs(lead, k, o, dtype=torch.float64, **make_kw)
    y, grads = _grads(mor_linear, inputs, call_kw)
    y_ref, grads_ref = _grads(reference_mor, inputs, call_kw)
    assert y.shape == (*lead, o)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"d{name}: {m}")


def test_non_contiguous_x():
    inputs = make_inputs((6,), 48, 20, dtype=torch.float64)
    base = inputs["x"]
    inputs["x"] = torch.cat([base, base], dim=-1)[:, ::2]  # stride 2 along K
    assert not inputs["x"].is_contiguous()
    y, grads = _grads(mor_linear, inputs, {})
    y_ref, grads_ref = _grads(reference_mor, inputs, {})
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [{}, {"groups": 3}, {"bypass": False}, {"router": False}],
                         ids=["default", "groups3", "no-bypass", "plain-lora"])
def test_gradcheck_fp64(cfg):
    make_kw, call_kw = _split(cfg)
    inputs = make_inputs((4,), 8, 6, dtype=torch.float64, **make_kw)
    names = [k for k in GRAD_NAMES if inputs[k] is not None]

    def fn(*leaves):
        merged = dict(inputs, **dict(zip(names, leaves)))
        return _call(mor_linear, merged, **call_kw)

    leaves = [inputs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_is_within_twice_pytorchs_own(dtype):
    """Error against fp64 at most 2x that of the eager PyTorch formula in the same dtype."""
    inputs = make_inputs((64,), 96, 80, dtype=dtype, seed=3)
    exact = {k: v.double() if v is not None else None for k, v in inputs.items()}
    y, grads = _grads(mor_linear, inputs, {})
    y_eager, grads_eager = _grads(reference_mor, inputs, {})
    y_exact, grads_exact = _grads(reference_mor, exact, {})
    assert y.dtype == dtype
    floor = torch.finfo(dtype).eps  # absolute slack for values that round exactly in eager
    assert _max_err(y, y_exact) <= 2 * _max_err(y_eager, y_exact) + floor
    for name in grads:
        ours, eager = _max_err(grads[name], grads_exact[name]), _max_err(grads_eager[name],
                                                                         grads_exact[name])
        assert ours <= 2 * eager + floor * grads_exact[name].abs().max().item(), name


def test_routing_probabilities_sum_to_one_and_shape():
    inputs = make_inputs((2, 5), 16, 12, groups=3, dtype=torch.float64)
    _, probs = _call(mor_linear_with_routing, inputs, groups=3)
    assert probs.shape == (2, 5, 3, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5, 3, dtype=torch.float64))


def test_nan_in_x_gives_nan_out():
    inputs = make_inputs((4,), 16, 12)
    inputs["x"][1, 3] = float("nan")
    y = _call(mor_linear, inputs)
    assert torch.isnan(y[1]).all()
    assert not torch.isnan(y[[0, 2, 3]]).any()


def test_unfrozen_base_gets_exact_gradients():
    inputs = make_inputs((5,), 16, 12, dtype=torch.float64)
    w = inputs["weight"].clone().requires_grad_()
    b = inputs["bias"].clone().requires_grad_()
    y = _call(mor_linear, dict(inputs, weight=w, bias=b))
    y.sum().backward()
    w2 = inputs["weight"].clone().requires_grad_()
    b2 = inputs["bias"].clone().requires_grad_()
    _call(reference_mor, dict(inputs, weight=w2, bias=b2)).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_autocast_runs_in_the_autocast_dtype():
    inputs = make_inputs((4,), 16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _call(mor_linear, inputs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _call(reference_mor, inputs), rtol=0.05, atol=0.05)


def test_opcheck_forward_and_backward_ops():
    for cfg in ({}, {"groups": 3}, {"router": False}):
        make_kw, call_kw = _split(cfg)
        inputs = make_inputs((6,), 16, 12, **make_kw)
        inputs["x"].requires_grad_()
        inputs["lora_a"].requires_grad_()
        args = (*inputs.values(), list(RANKS), list(SCALINGS), call_kw.get("bypass", True),
                call_kw.get("groups", 1), "torch")
        torch.library.opcheck(functional.mor_linear_fwd, args)
        y, probs = functional.mor_linear_fwd(*args)
        bwd_args = (torch.randn_like(y), inputs["x"].detach(), probs, inputs["weight"],
                    inputs["lora_a"].detach(), inputs["lora_b"], inputs["router_weight"],
                    *args[7:], True)
        torch.library.opcheck(functional.mor_linear_bwd, bwd_args)


def test_torch_compile_fullgraph_matches_eager():
    inputs = make_inputs((3, 5), 16, 12, groups=3)

    def loss_fn(x, a, b, rw, rb):
        y = mor_linear(x, inputs["weight"], inputs["bias"], a, b, rw, rb, ranks=RANKS,
                       scalings=SCALINGS, groups=3)
        return (y * y).sum()

    leaves = [inputs[k] for k in GRAD_NAMES]
    eager = [t.clone().requires_grad_() for t in leaves]
    compiled = [t.clone().requires_grad_() for t in leaves]
    loss_fn(*eager).backward()
    torch.compile(loss_fn, fullgraph=True)(*compiled).backward()
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("groups", [1, 3], ids=["one-group-keeps-u", "qkv-recomputes-u"])
def test_saved_for_backward_is_x_plus_32_elements_per_token(groups):
    """Saved bytes = bytes(x) + at most 32 elements per token, counting whole storages (a kept
    view keeps its whole base alive), and never an N x O tensor."""
    n, k, o = 50, 64, 48
    inputs = make_inputs((n,), k, o, groups=groups)
    leaves = {name: (v.requires_grad_() if name in GRAD_NAMES and v is not None else v)
              for name, v in inputs.items()}
    params = {t.untyped_storage().data_ptr() for name, t in leaves.items()
              if name != "x" and t is not None}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _call(mor_linear, leaves, groups=groups)
    x_bytes = leaves["x"].numel() * leaves["x"].element_size()
    assert x_bytes <= sum(saved.values()) <= x_bytes + 32 * n * 4
    assert max(saved.values()) < n * o * 4 or max(saved.values()) == x_bytes


def test_router_without_bias_has_no_bias_gradient():
    inputs = make_inputs((5,), 16, 12)
    inputs["router_bias"] = None
    y, grads = _grads(mor_linear, inputs, {})
    y_ref, grads_ref = _grads(reference_mor, inputs, {})
    torch.testing.assert_close(y, y_ref)
    assert "router_bias" not in grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name])


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), "torch"),  # T4: the fused kernels would run on CUDA cores (no bf16 MMA)
    ((7, 0), "torch"),  # V100
    ((8, 0), "triton"),
    ((9, 0), "triton"),
])
def test_auto_backend_on_a_gpu_follows_its_architecture(monkeypatch, capability, expected):
    from ei_kernels import backends

    monkeypatch.setattr(backends, "cuda_capability", lambda device: capability)
    assert backends.resolve("auto", torch.device("cuda:0"), torch.bfloat16) == expected
    assert backends.resolve("auto", torch.device("cuda:0"), torch.float64) == "torch"
