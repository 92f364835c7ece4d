"""The CUDA C++ backend (csrc/, ei_kernels._C) on a CUDA GPU, run by scripts/gpu_check.sh:
forward and every gradient against the torch backend and an fp64 reference in fp32/bf16/fp16,
odd shapes (every dimension ending in a partial tile), N = 0 and 1, each flag off, groups=3,
bitwise determinism, CUDA graph capture and replay, torch.compile(fullgraph=True)."""

import pytest
import torch

import ei_kernels
from ei_kernels import mor_linear
from gpu_common import (DTYPES, RANKS, SCALINGS, check_against_torch_and_fp64,
                        check_compile_fullgraph, check_cuda_graph_replay, make_inputs, make_layer,
                        run)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (tokens, K, O, config, dtype): ViT-B layers (1576 tokens = batch 8, 12608 = batch 64; the
# latter also splits the token reductions in many parts) and odd shapes.
CASES = [
    pytest.param(1576, 768, 768, {}, "fp32", id="default-fp32"),
    pytest.param(1576, 768, 768, {}, "bf16", id="default-bf16"),
    pytest.param(1576, 768, 768, {}, "fp16", id="default-fp16"),
    pytest.param(1576, 768, 2304, {"groups": 3}, "bf16", id="qkv-groups3-bf16"),
    pytest.param(1576, 768, 2304, {"groups": 3}, "fp32", id="qkv-groups3-fp32"),
    pytest.param(1576, 768, 768, {"bypass": False}, "bf16", id="no-bypass-bf16"),
    pytest.param(1576, 768, 768, {"router": False}, "fp16", id="plain-lora-fp16"),
    pytest.param(1576, 768, 768, {"bias": False}, "bf16", id="no-bias-bf16"),
    pytest.param(1576, 768, 768, {"non_contiguous": True}, "fp16", id="non-contiguous-fp16"),
    pytest.param(1576, 768, 768, {"no_dx": True}, "bf16", id="no-dx-bf16"),
    pytest.param(12608, 768, 3072, {}, "bf16", id="mlp-fc1-12608-bf16"),
    pytest.param(12608, 3072, 768, {}, "fp32", id="mlp-fc2-12608-fp32"),
    pytest.param(333, 100, 37, {}, "bf16", id="odd-K100-O37-bf16"),
    pytest.param(333, 100, 37, {}, "fp32", id="odd-K100-O37-fp32"),
    pytest.param(333, 100, 36, {"groups": 3}, "fp16", id="odd-K100-O36-groups3-fp16"),
    pytest.param(333, 100, 36, {"groups": 3, "router": False}, "bf16", id="odd-groups3-lora"),
    pytest.param(1, 100, 37, {}, "bf16", id="one-token-bf16"),
    pytest.param(1, 768, 768, {"groups": 3}, "fp32", id="one-token-groups3-fp32"),
    pytest.param(0, 100, 36, {"groups": 3}, "bf16", id="no-tokens-bf16"),
]


def test_extension_is_loaded():
    info = ei_kernels.cuda_extension_info()
    assert info["loaded"], info["reason"]
    assert "cuda" in ei_kernels.available_backends("cuda")


@pytest.mark.parametrize("n, k, o, cfg, dtype", CASES)
def test_forward_and_grads_match_torch_and_fp64(n, k, o, cfg, dtype):
    # The kernels round once where PyTorch rounds the shrink, the logits and y's two terms
    # separately, but sum in another order: a few ulps of the largest value on top.
    check_against_torch_and_fp64("cuda", n, k, o, cfg, DTYPES[dtype], ulps=4)


def test_float64_is_refused_with_a_clear_error():
    inputs, _ = make_inputs(8, 32, 24, {}, torch.float64)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        mor_linear(*inputs.values(), ranks=RANKS, scalings=SCALINGS, backend="cuda")


def test_backward_is_bitwise_reproducible():
    cfg = {"groups": 3}
    inputs, dy = make_inputs(12608, 768, 2304, cfg, torch.bfloat16, seed=1)
    first, second = run("cuda", inputs, dy, cfg)[2], run("cuda", inputs, dy, cfg)[2]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_cuda_graph_capture_and_replay():
    check_cuda_graph_replay(make_layer("cuda"))


def test_torch_compile_fullgraph_forward_and_backward():
    check_compile_fullgraph(make_layer("cuda"))


def test_opcheck_on_cuda_tensors():
    """Schema, fake tensor and dispatch checks of the C++ ops with real kernels behind them."""
    cfg = {"groups": 3}
    inputs, dy = make_inputs(70, 100, 36, cfg, torch.bfloat16)
    args = (*inputs.values(), list(RANKS), list(SCALINGS), True, 3)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ei_kernels_cuda.mor_fwd.default, args, test_utils=tests)
    _, probs = torch.ops.ei_kernels_cuda.mor_fwd(*args)
    bwd_args = (dy, inputs["x"], probs, inputs["weight"], inputs["lora_a"], inputs["lora_b"],
                inputs["router_weight"], list(RANKS), list(SCALINGS), True, 3, True)
    torch.library.opcheck(torch.ops.ei_kernels_cuda.mor_bwd.default, bwd_args, test_utils=tests)
