"""The Triton backend on a CUDA GPU (run by scripts/gpu_check.sh): ViT-B sizes in fp32, bf16 and
fp16 against the torch backend and fp64, deterministic and atomic reductions, CUDA graph capture
and replay, torch.compile(fullgraph=True) of FusedMoRLinear(backend="triton")."""

import pytest
import torch

from gpu_common import (DTYPES, check_against_torch_and_fp64, check_compile_fullgraph,
                        check_cuda_graph_replay, make_inputs, make_layer, run)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

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
    # Large 16-bit layers run programs of up to 4 column tiles (triton_configs col_tiles), as
    # many as the launcher's round model picks for this GPU's SM count (triton_schedule; on
    # 132 SMs: fc1's forward and fc2's backward chunks of 3, qkv's forward of 2 per group).
    # test_programs_of_the_fewest_chunks runs the same cases in the largest chunks.
    pytest.param(12608, 768, 3072, {}, "bf16", id="mlp-fc1-12608-bf16"),
    pytest.param(12608, 3072, 768, {}, "bf16", id="mlp-fc2-12608-bf16"),
    pytest.param(12608, 768, 2304, {"groups": 3}, "bf16", id="qkv-groups3-12608-bf16"),
    pytest.param(12608, 3072, 768, {}, "fp32", id="mlp-fc2-12608-fp32"),
    pytest.param(333, 100, 120, {"groups": 3}, "bf16", id="odd-groups3-bf16"),
]


@pytest.fixture
def poisoned(monkeypatch):
    from ei_kernels.ops import triton_mor

    monkeypatch.setattr(triton_mor, "POISON_OUTPUTS", True)
    return triton_mor


@pytest.mark.parametrize("n, k, o, cfg, dtype", CASES)
def test_forward_and_grads_match_torch_and_fp64(poisoned, n, k, o, cfg, dtype):
    check_against_torch_and_fp64("triton", n, k, o, cfg, DTYPES[dtype], ulps=1)


@pytest.mark.parametrize("n, k, o, cfg, dtype", [c for c in CASES if c.values[0] == 12608
                                                and c.values[4] == "bf16"])
def test_programs_of_the_fewest_chunks(poisoned, monkeypatch, n, k, o, cfg, dtype):
    """What the launcher runs where the GPU's size is unknown: chunks of col_tiles tiles
    (qkv's backward then computes u in chunks of 3 dx tiles, which 132 SMs never pick)."""
    monkeypatch.setattr(poisoned, "_slots", lambda device, cfg: None)
    check_against_torch_and_fp64("triton", n, k, o, cfg, DTYPES[dtype], ulps=1)


def _backward_outputs(n=1576, k=768, o=2304, cfg=None, dtype=torch.bfloat16):
    cfg = cfg or {"groups": 3}
    inputs, dy = make_inputs(n, k, o, cfg, dtype, seed=1)
    _, _, grads = run("triton", inputs, dy, cfg)
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


def test_cuda_graph_capture_and_replay():
    check_cuda_graph_replay(make_layer("triton"))


def test_torch_compile_fullgraph_forward_and_backward():
    check_compile_fullgraph(make_layer("triton"))
