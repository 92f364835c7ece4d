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
    # Large 16-bit layers: both kernels share per-row work between programs, and split a last
    # round at most half full and fit the sweep size to this GPU's SM count (triton_schedule;
    # on 132 SMs the forward of proj, qkv and fc2 and the backward of proj, qkv and fc1 split
    # their last 66 tiles).
    # test_programs_in_the_table_order runs the same cases with the GPU's size unknown.
    pytest.param(12608, 768, 3072, {}, "bf16", id="mlp-fc1-12608-bf16"),
    pytest.param(12608, 3072, 768, {}, "bf16", id="mlp-fc2-12608-bf16"),
    pytest.param(12608, 768, 2304, {"groups": 3}, "bf16", id="qkv-groups3-12608-bf16"),
    pytest.param(12608, 3072, 768, {}, "fp32", id="mlp-fc2-12608-fp32"),
    pytest.param(333, 100, 120, {"groups": 3}, "bf16", id="odd-groups3-bf16"),
    # Reductions of one step (K = 40, O = 24 under 64-wide steps), in a launch far under a
    # round: nothing to split.
    pytest.param(33, 40, 24, {}, "bf16", id="tiny-bf16"),
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
def test_programs_in_the_table_order(poisoned, monkeypatch, n, k, o, cfg, dtype):
    """What the launcher runs where the GPU's size is unknown: the table's sweeps of row
    blocks, no tile split."""
    monkeypatch.setattr(poisoned, "_slots", lambda device, cfg: None)
    check_against_torch_and_fp64("triton", n, k, o, cfg, DTYPES[dtype], ulps=1)


def _forward_outputs(n, k, o, cfg, dtype=torch.bfloat16, backward=False):
    """(y, probs, u) of the Triton forward, and with backward its gradients, u kept and not."""
    from ei_kernels.ops import triton_mor
    from ei_kernels.spec import MoRSpec

    inputs, dy = make_inputs(n, k, o, cfg, dtype, seed=2)
    spec = MoRSpec.build((2, 4, 8), (2.0, 1.0, 0.5), groups=cfg.get("groups", 1))
    y, probs, u = triton_mor.forward(*inputs.values(), spec, keep_u=True)
    if not backward:
        return y, probs, u
    i = inputs
    args = (dy, i["x"], probs, i["weight"], i["lora_a"], i["lora_b"], i["router_weight"], spec,
            True)
    return (y, probs, u, *triton_mor.backward(*args, u=u), *triton_mor.backward(*args))


@pytest.mark.parametrize("n, k, o, cfg", [(12608, 768, 768, {}),
                                          (12608, 768, 2304, {"groups": 3})],
                         ids=["proj-12608", "qkv-groups3-12608"])
def test_outputs_are_bitwise_the_same_whoever_computes_the_shared_rows(poisoned, monkeypatch,
                                                                       n, k, o, cfg):
    """A tile takes what its row block's first tile published (forward z, backward du | dl |
    z), or computes it where that is not published yet (timing decides which): the same bits
    either way. Five shared runs and one with nothing published agree exactly."""
    runs = [_forward_outputs(n, k, o, cfg, backward=True) for _ in range(5)]
    monkeypatch.setattr(poisoned, "SHARE_Z", False)
    runs.append(_forward_outputs(n, k, o, cfg, backward=True))
    for outputs in runs[1:]:
        for a, b in zip(runs[0], outputs):
            assert not a.isnan().any() and torch.equal(a, b)


def test_every_tile_split_in_two_halves(poisoned, monkeypatch):
    """A launch under half a round splits every tile: made so here for a ViT-B proj layer by a
    GPU twice the size of its 594 tiles (forward and backward), against torch and fp64."""
    n, k, o = 12608, 768, 768
    monkeypatch.setattr(poisoned, "_slots", lambda device, cfg: 2 * (-(-n // cfg.block_m)) * 6)
    check_against_torch_and_fp64("triton", n, k, o, {}, torch.bfloat16, ulps=1)


def test_forwards_on_two_streams_at_once(poisoned):
    """Each stream has its own flags: two forwards that overlap do not take each other's z."""
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    cfg = {"groups": 3}
    expected = [_forward_outputs(12608, 768, 2304, cfg, dtype) for dtype in
                (torch.bfloat16, torch.float16)]
    torch.cuda.synchronize()
    outs = []
    for stream, dtype in ((first, torch.bfloat16), (second, torch.float16)):
        with torch.cuda.stream(stream):
            outs.append(_forward_outputs(12608, 768, 2304, cfg, dtype))
    torch.cuda.synchronize()
    for got, want in zip(outs, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


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
