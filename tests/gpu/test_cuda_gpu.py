"""The CUDA C++ backend (csrc/, ei_kernels._C) on a CUDA GPU, run by scripts/gpu_check.sh:
forward and every gradient against the torch backend and an fp64 reference in fp32/bf16/fp16,
odd shapes (every dimension ending in a partial tile), N = 0 and 1, each flag off, groups=3,
bitwise determinism, CUDA graph capture and replay, torch.compile(fullgraph=True). On an
H100/H200 the 16-bit cases whose rows TMA can load take the sm_90a kernels, routed where they
fit (the K=104/O=40 ones: partial tiles in every dimension there), the rest the portable
ones; both are also compared
with the switch EI_KERNELS_CUDA_SM90=0, the sm_90a GEMM without the routed kernels with
EI_KERNELS_CUDA_SM90=unrouted, and the routed input gradient without d[A_cat; R] with
EI_KERNELS_CUDA_SM90=unfolded; persistent CTAs against one CTA per tile
(EI_KERNELS_CUDA_SM90_PERSISTENT=0) bit for bit, the routed kernels walked in runs or
round-robin (EI_KERNELS_CUDA_SM90_RUNS; bit for bit but for the token reductions where the
input gradient's walks add its partials in different slots), the backward's launches as programmatic
dependents or plain (EI_KERNELS_CUDA_PDL), also inside a CUDA graph; the routed forward's
shrink shared out in clusters of 1, 2 and 4 column tiles (EI_KERNELS_CUDA_SM90_CLUSTER); the
routed input gradient's B rows for odd and full ranks, a B it cannot bulk-copy, grouped
layers, and its partials added in slots shared by each CTA's row tiles."""

import os

import pytest
import torch

import ei_kernels
from ei_kernels import mor_linear, mor_linear_with_routing
from ei_kernels.ops import torch_mor
from gpu_common import (DTYPES, RANKS, SCALINGS, check, check_against_torch_and_fp64,
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
    # 44 token splits of 288 for d[A_cat; R] on 132 SMs: the last four have no tokens
    pytest.param(11265, 768, 768, {}, "bf16", id="empty-token-splits-bf16"),
    pytest.param(333, 104, 40, {}, "bf16", id="odd-tiles-K104-O40-bf16"),
    pytest.param(333, 104, 48, {"groups": 3}, "fp16", id="odd-tiles-K104-O48-groups3-fp16"),
    pytest.param(333, 100, 37, {}, "bf16", id="odd-K100-O37-bf16"),
    pytest.param(333, 100, 37, {}, "fp32", id="odd-K100-O37-fp32"),
    pytest.param(333, 100, 36, {"groups": 3}, "fp16", id="odd-K100-O36-groups3-fp16"),
    pytest.param(333, 100, 36, {"groups": 3, "router": False}, "bf16", id="odd-groups3-lora"),
    pytest.param(1, 100, 37, {}, "bf16", id="one-token-bf16"),
    pytest.param(1, 768, 768, {"groups": 3}, "fp32", id="one-token-groups3-fp32"),
    pytest.param(0, 100, 36, {"groups": 3}, "bf16", id="no-tokens-bf16"),
    # no input features: y is the bias, and dB and dc still come out (from z = 0 and dl)
    pytest.param(333, 0, 40, {}, "fp32", id="no-in-features-fp32"),
    pytest.param(333, 0, 40, {}, "bf16", id="no-in-features-bf16"),
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


def _hopper_gemm_expected() -> bool:
    return bool(ei_kernels.cuda_extension_info()["sm90_gemm"]) and (
        torch.cuda.get_device_capability() == (9, 0))


@pytest.fixture
def sm90_kernels():
    """Skips a test of the sm_90a kernels unless they run here: built, on a compute
    capability 9.0 GPU (asked when the test runs, never at import)."""
    if not _hopper_gemm_expected():
        pytest.skip("needs the sm_90a kernels on a compute capability 9.0 GPU")


def _launches(prof, kernel: str) -> int:
    """Launches of the kernels whose names hold `kernel` (an sm_90a one: "routed_gemm_kernel",
    "routed_dgrad_kernel", "ext_gemm_kernel"; "block_diagonal_kernel") or, for "portable", of
    the portable GEMM."""
    names = [e.name for e in prof.events()]
    if kernel == "portable":
        return sum("gemm_kernel" in name and "ext_gemm_kernel" not in name
                   and "routed_gemm_kernel" not in name for name in names)
    return sum(kernel in name for name in names)


@pytest.mark.parametrize("switch", ["1", "unfolded", "unrouted", "0"],
                         ids=["sm90-on", "sm90-unfolded", "sm90-unrouted", "sm90-off"])
@pytest.mark.parametrize("n, k, o, cfg, dtype", [
    pytest.param(1576, 768, 2304, {"groups": 3}, "bf16", id="qkv-groups3-bf16"),
    pytest.param(333, 104, 40, {"bypass": False}, "fp16", id="odd-tiles-no-bypass-fp16"),
    pytest.param(333, 104, 40, {"router": False}, "bf16", id="odd-tiles-plain-lora-bf16"),
    # 6 dx column tiles, 1 K step: five of each row tile's column tiles have no dB share
    pytest.param(333, 1000, 40, {}, "bf16", id="more-dx-column-tiles-than-k-steps-bf16"),
])
def test_both_gemm_paths_match_torch_and_fp64(monkeypatch, switch, n, k, o, cfg, dtype):
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90", switch)
    check_against_torch_and_fp64("cuda", n, k, o, cfg, DTYPES[dtype], ulps=4)


def _dgrad_slots(n, k, o, groups, env) -> int:
    """The routed input gradient's partial slots on this GPU under the switches of `env`, as
    csrc/sm90_routed_dgrad.cu's dgrad_launch (tile_ctas, walks_in_runs, segment_launch): one
    per row tile, or, walked round-robin over more tiles than CTAs with the CTAs a multiple of
    the column tiles, one per CTA of a column tile, which adds its row tiles' partials."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    sms = props.multi_processor_count
    row_tiles, col_tiles = -(-n // 128), -(-k // 192)
    tiles = row_tiles * col_tiles
    ctas = tiles if env.get("EI_KERNELS_CUDA_SM90_PERSISTENT") == "0" else min(tiles, sms)
    runs_switch = env.get("EI_KERNELS_CUDA_SM90_RUNS", "")
    if runs_switch in ("0", "1"):
        runs = runs_switch == "1"
    else:  # dy's row blocks in flight, one per CTA, in at most half the L2
        runs = sms * 128 * o * 2 <= props.L2_cache_size // 2
    if groups == 1 and runs:
        return row_tiles
    return ctas // col_tiles if tiles > ctas and ctas % col_tiles == 0 else row_tiles


def _reordered(variable, values, n, k, o, groups) -> tuple[str, ...]:
    """The gradients that the routed input gradient sums from its slots in another order for
    some of `values` of the environment variable (its slots differ): dB's, and d[A_cat; R]'s
    unless "unfolded"; none where the routed input gradient does not run."""
    mode = os.environ.get("EI_KERNELS_CUDA_SM90") or "1"
    if mode in ("0", "unrouted") or not _hopper_gemm_expected():
        return ()
    slots = {_dgrad_slots(n, k, o, groups, {**os.environ, variable: value}) for value in values}
    if len(slots) == 1:
        return ()
    return ("lora_b",) if mode == "unfolded" else ("lora_a", "lora_b", "router_weight")


def _same_bits_under(monkeypatch, variable, values, n, k, o, groups, cfg=None):
    """y, p and every gradient of one bf16 forward + backward (groups, and the flags of cfg),
    run once with the environment variable at each of `values` in turn, agree bit for bit;
    but for those that the routed input gradient adds in another order where the values give
    it different partial slots (_reordered), which each run must get right against the torch
    backend and fp64 instead."""
    cfg = {**(cfg or {}), "groups": groups}
    reordered = _reordered(variable, values, n, k, o, groups)
    inputs, dy = make_inputs(n, k, o, cfg, torch.bfloat16)
    results = []
    for value in values:
        monkeypatch.setenv(variable, value)
        results.append(run("cuda", inputs, dy, cfg))
    (y0, p0, g0), rest = results[0], results[1:]
    for y, p, g in rest:
        assert torch.equal(y, y0) and torch.equal(p, p0)
        for name in g0:
            assert name in reordered or torch.equal(g[name], g0[name]), name
    if reordered:
        _, _, grads_t = run("torch", inputs, dy, cfg)
        _, _, grads_x = run("torch", inputs, dy, cfg, dtype=torch.float64)
        for _, _, g in results:
            for name in reordered:
                if name in g:
                    check(name, g[name], grads_t[name], grads_x[name], ulps=4)


@pytest.mark.parametrize("switch", ["1", "unfolded", "unrouted"],
                         ids=["routed", "routed-unfolded", "unrouted"])
@pytest.mark.parametrize("n, k, o, groups", [
    pytest.param(12608, 768, 768, 1, id="proj-12608-3-tiles-per-sm"),
    # round-robin (3 groups): on 132 SMs 33 shared slots against one per row tile
    pytest.param(12608, 768, 2304, 3, id="qkv-12608-9-tiles-per-sm"),
    pytest.param(333, 104, 40, 1, id="odd-K104-O40-fewer-tiles-than-sms"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_persistent_ctas_give_the_same_bits_as_one_cta_per_tile(monkeypatch, switch, n, k, o,
                                                                groups):
    """One persistent CTA per SM walking the tiles and one CTA per tile compute every tile
    the same way: y and every gradient agree bit for bit (and a tile left unwritten or
    written twice by the walk would show), but where the persistent walk shares the partials'
    slots (then those gradients are right against fp64 both ways)."""
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90", switch)
    _same_bits_under(monkeypatch, "EI_KERNELS_CUDA_SM90_PERSISTENT", ("1", "0"), n, k, o, groups)


@pytest.mark.parametrize("cluster", ["1", "2", "4"])
@pytest.mark.parametrize("n, k, o, groups", [
    # (on 132 SMs the input gradient round-robin over 4 (6) column tiles: 33 (22) shared slots)
    pytest.param(12608, 768, 768, 1, id="proj-12608-3-tiles-per-sm"),
    pytest.param(12608, 768, 3072, 1, id="fc1-12608-12-tiles-per-sm"),
    pytest.param(12608, 3072, 768, 1, id="fc2-12608-round-robin-by-default"),
    pytest.param(1576, 768, 2304, 3, id="qkv-runs-end-at-each-group"),
    pytest.param(4100, 1000, 1000, 1, id="N4100-O1000-6-column-tiles"),
    pytest.param(333, 104, 40, 1, id="odd-K104-O40-fewer-tiles-than-sms"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_kernels_walked_in_runs_give_the_same_bits_as_round_robin(monkeypatch, cluster,
                                                                      n, k, o, groups):
    """The routed kernels' tiles walked in runs of one row block (and group), a run's later
    tiles reusing its first tile's z (forward) or g, du and dl (input gradient, one group)
    (EI_KERNELS_CUDA_SM90_RUNS=1), give y, p and every gradient bit for bit as walked
    round-robin with every tile computing its own (=0): z and g are the same wherever they are
    computed, and each tile sums its K steps in the same order. A run that reused another
    group's or row block's z or g, or a tile left unwritten, would show. (Where round-robin
    shares the partials' slots, those gradients are right against fp64 both ways.)"""
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90_CLUSTER", cluster)
    _same_bits_under(monkeypatch, "EI_KERNELS_CUDA_SM90_RUNS", ("1", "0"), n, k, o, groups)


@pytest.mark.parametrize("switch, cfg", [
    pytest.param("1", {"router": False}, id="plain-lora"),
    pytest.param("1", {"bypass": False}, id="no-bypass"),
    pytest.param("unfolded", {}, id="unfolded-first-column-writes-du-dl"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_input_gradient_in_runs_keeps_du_and_dl_for_every_routing(monkeypatch, switch, cfg):
    """fc2's input gradient walked in runs (12 tiles a CTA over row blocks of 16), whose later
    tiles keep their run's g, du and dl, gives the same bits as round-robin also without a
    router, without the bypass, and unfolded (where the first column tile writes [du | dl])."""
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90", switch)
    _same_bits_under(monkeypatch, "EI_KERNELS_CUDA_SM90_RUNS", ("1", "0"), 12608, 3072, 768, 1,
                     cfg)


@pytest.mark.parametrize("n, k, o, cfg", [
    # (slots on 132 SMs)
    pytest.param(12608, 768, 2304, {"groups": 3}, id="qkv-12608-33-slots-of-3-row-tiles"),
    pytest.param(12608, 768, 3072, {}, id="fc1-12608-33-slots"),
    pytest.param(12608, 768, 768, {"router": False}, id="proj-plain-lora-12608-33-slots"),
    pytest.param(12608, 576, 768, {}, id="K576-3-column-tiles-44-slots"),
    # 24 row tiles x 6 column tiles: 22 slots; row tiles 22 (full) and 23 (56 tokens) add to
    # slots 0 and 1
    pytest.param(3000, 1000, 1000, {}, id="N3000-K1000-22-slots-two-adding"),
    pytest.param(3000, 1000, 576, {"groups": 3}, id="N3000-K1000-groups3-22-slots"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_input_gradient_adds_its_row_tiles_in_shared_slots(monkeypatch, n, k, o, cfg):
    """Walked round-robin on a grid that is a multiple of its column tiles (an H100/H200's 132
    SMs), each CTA of the routed input gradient adds its row tiles' partials of dB and
    d[A_cat; R] into one slot, which it wrote first: every gradient right against torch and
    fp64, the same bits twice. A slot left unwritten, or added to by two CTAs, would show."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90_RUNS", "0")
    groups = cfg.get("groups", 1)
    if _dgrad_slots(n, k, o, groups, dict(os.environ)) == -(-n // 128):
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        pytest.skip(f"this GPU's {sms} SMs are no multiple of the {-(-k // 192)} column tiles: "
                    f"the walk shares no slots here (132-SM H100/H200 SXM do)")
    check_against_torch_and_fp64("cuda", n, k, o, cfg, torch.bfloat16, ulps=4)
    _same_bits_under(monkeypatch, "EI_KERNELS_CUDA_SM90_RUNS", ("0", "0"), n, k, o, groups, cfg)


@pytest.mark.parametrize("n, k, o, groups", [
    pytest.param(12608, 768, 768, 1, id="proj-12608"),
    pytest.param(12608, 3072, 768, 1, id="fc2-12608-largest-partials"),
    pytest.param(12608, 768, 2304, 3, id="qkv-12608"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_launches_as_dependents_give_the_same_bits(monkeypatch, n, k, o, groups):
    """The backward's sum of the partials, launched as the routed input gradient's
    programmatic dependent (the default), reads them only once that kernel has ended, and
    that kernel (qkv: after the u GEMM, as its dependent) reads u only once it is written:
    every gradient the same bits, over repeated runs, as with plain launches
    (EI_KERNELS_CUDA_PDL=0). A kernel that read its inputs before they were written would
    differ."""
    _same_bits_under(monkeypatch, "EI_KERNELS_CUDA_PDL", ("0", "1", "1"), n, k, o, groups)


@pytest.mark.parametrize("cluster", ["1", "2", "4"])
@pytest.mark.parametrize("n, k, o, groups", [
    pytest.param(12608, 768, 768, 1, id="proj-12608-4-column-tiles"),
    pytest.param(1576, 768, 2304, 3, id="qkv-4-column-tiles-per-group"),
    pytest.param(333, 768, 1000, 1, id="O1000-6-column-tiles-quads-fall-back-to-pairs"),
    pytest.param(333, 768, 576, 1, id="O576-3-column-tiles-cluster-halved-to-1"),
    pytest.param(333, 104, 40, 1, id="odd-K104-O40-2-k-steps-1-column-tile"),
    # 2 K steps over 4 column tiles: in quads two CTAs have no share of the shrink
    pytest.param(333, 104, 768, 1, id="K104-O768-fewer-k-steps-than-ctas"),
    pytest.param(4100, 1000, 1000, 1, id="N4100-K1000-16-k-steps-persistent-walks"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_forward_shares_the_shrink_in_a_cluster_and_stays_right(monkeypatch, cluster, n, k,
                                                                    o, groups):
    """The routed forward's column tiles of a row block, in clusters of 1, 2 or 4 CTAs (fewer
    where the group's column tiles are not a multiple), each multiply x by [A_cat; R] in their
    share of the K steps and sum the partials through distributed shared memory: y, p and every
    gradient stay right, twice the same bits, and persistent CTAs agree with one per tile (bit
    for bit, but where the input gradient's persistent walk shares the partials' slots: then
    right against fp64 both ways)."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90_CLUSTER", cluster)
    check_against_torch_and_fp64("cuda", n, k, o, {"groups": groups}, torch.bfloat16, ulps=4)
    inputs, dy = make_inputs(n, k, o, {"groups": groups}, torch.bfloat16)
    results = []
    for persistent in ("1", "1", "0"):
        monkeypatch.setenv("EI_KERNELS_CUDA_SM90_PERSISTENT", persistent)
        results.append(run("cuda", inputs, dy, {"groups": groups}))
    (y, p, g), *others = results
    # (N4100: the input gradient walks 198 tiles round-robin, on 132 SMs over 6 column tiles
    # sharing 22 slots, one CTA per tile 33: the two add dB and d[A_cat; R] in other orders)
    reordered = _reordered("EI_KERNELS_CUDA_SM90_PERSISTENT", ("1", "0"), n, k, o, groups)
    for y_other, p_other, g_other in others:
        assert torch.equal(y, y_other) and torch.equal(p, p_other)
        for name in g:
            assert name in reordered or torch.equal(g[name], g_other[name]), name
    if reordered:  # one CTA per tile's sums right as well
        check_against_torch_and_fp64("cuda", n, k, o, {"groups": groups}, torch.bfloat16, ulps=4)


@pytest.mark.parametrize("switch", ["1", "unfolded", "unrouted", "0"],
                         ids=["sm90-on", "sm90-unfolded", "sm90-unrouted", "sm90-off"])
def test_the_hopper_gemm_runs_exactly_where_it_should(monkeypatch, switch):
    """Kernel names from the profiler: on an H100/H200 build that holds them, unless switched
    off, the routed sm_90a kernel is the whole forward and the routed input gradient runs g,
    the routing, dx and the token reductions' partials ("unfolded": d[A_cat; R]'s on a
    portable launch of their own); "unrouted", the sm_90a GEMM runs y and dx with the shrink,
    g and the routing around it; nowhere else."""
    monkeypatch.setenv("EI_KERNELS_CUDA_SM90", switch)
    layer = make_layer("cuda")
    x = torch.randn(256, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = layer(x)
        torch.cuda.synchronize()
    hopper = switch != "0" and _hopper_gemm_expected()
    routed = hopper and switch in ("1", "unfolded")
    assert _launches(prof, "routed_gemm_kernel") == int(routed)
    assert _launches(prof, "ext_gemm_kernel") == int(hopper and not routed)
    if routed:  # nothing else runs in the forward
        assert len({e.name for e in prof.events() if e.device_type.name == "CUDA"}) == 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y.float().square().sum().backward()
        torch.cuda.synchronize()
    assert _launches(prof, "routed_dgrad_kernel") == int(routed)
    assert _launches(prof, "ext_gemm_kernel") == int(hopper and not routed)
    assert _launches(prof, "routed_gemm_kernel") == 0
    if routed:  # u kept, the token reductions' partials inside the routed input gradient
        # (no GEMM left but the sum; "unfolded": and d[A_cat; R]'s), and B's rows read in
        # place (no padded copy first)
        assert _launches(prof, "portable") == int(switch == "unfolded")
        assert _launches(prof, "block_diagonal_kernel") == 0


@pytest.mark.parametrize("n, o, groups, routed", [
    pytest.param(1576, 768, 1, True, id="one-group"),
    pytest.param(1576, 2304, 3, True, id="qkv-groups3"),
    # 40 outputs per group: not whole 64-column K steps
    pytest.param(1576, 120, 3, False, id="groups3-40-per-group"),
    # 513 row tiles: past the 512 row-tile partials that the routed kernel writes
    pytest.param(513 * 128, 768, 1, False, id="one-group-65664-tokens"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_input_gradient_routes_inside_the_gemm_where_groups_fill_whole_k_steps(
        monkeypatch, n, o, groups, routed):
    """g, the routing, dx and every token reduction's partials in one routed launch where each
    group's outputs are whole 64-column K steps (one group, qkv); else, or past 65536 tokens, g
    and the routing as their own launches, then dx on the sm_90a GEMM. All stay right,
    gradients included."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    inputs, dy = make_inputs(n, 768, o, {"groups": groups}, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run("cuda", inputs, dy, {"groups": groups})
        torch.cuda.synchronize()
    assert _launches(prof, "routed_dgrad_kernel") == int(routed)
    # the sm_90a GEMM: the input gradient's where it is not routed, and the forward's where a
    # group is not whole 192-column tiles (then the forward is not routed either)
    forward_routed = groups == 1 or o // groups % 192 == 0
    assert _launches(prof, "ext_gemm_kernel") == int(not routed) + int(not forward_routed)
    check_against_torch_and_fp64("cuda", n, 768, o, {"groups": groups}, torch.bfloat16, ulps=4)


@pytest.mark.parametrize("n, k, o, cfg, dtype", [
    # 2 K steps per group; N and K end in partial tiles
    pytest.param(333, 104, 256, {"groups": 2}, "bf16", id="groups2-K104-O256"),
    pytest.param(333, 104, 256, {"groups": 2}, "fp16", id="groups2-K104-O256-fp16"),
    # 6 column tiles, 1 K step per group: most (tile, group) pairs have no dB share
    pytest.param(333, 1000, 192, {"groups": 3}, "bf16", id="groups3-more-column-tiles-than-steps"),
    # 6 column tiles, 4 K steps per group: a column tile's shares of dB's work cross from one
    # group into the next at a different step in each group
    pytest.param(333, 1000, 768, {"groups": 3}, "bf16", id="groups3-shares-cross-groups"),
    pytest.param(333, 104, 192, {"groups": 3, "router": False}, "bf16", id="groups3-plain-lora"),
    pytest.param(333, 104, 192, {"groups": 3, "bypass": False}, "bf16", id="groups3-no-bypass"),
    # odd ranks: a group's 16 rows of A_cat in the extension reach into the next group's
    pytest.param(333, 104, 192, {"groups": 3, "ranks": (1, 2, 4), "scalings": (1.0, 0.5, 0.25)},
                 "bf16", id="groups3-r7"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_grouped_routed_input_gradient_stays_right(monkeypatch, n, k, o, cfg, dtype):
    """The routed input gradient walks each tile's K steps group by group, routing and
    extending per group: odd tiles, column tiles without a share of a group's dB work or with
    shares crossing groups, each flag off and odd ranks stay right (against torch and fp64)."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    inputs, dy = make_inputs(n, k, o, cfg, DTYPES[dtype])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run("cuda", inputs, dy, cfg)
        torch.cuda.synchronize()
    assert _launches(prof, "routed_dgrad_kernel") == 1
    check_against_torch_and_fp64("cuda", n, k, o, cfg, DTYPES[dtype], ulps=4)


@pytest.mark.parametrize("o, ranks, scalings", [
    # B's rows: 14 values (28 bytes), 7 (odd: rows start at odd offsets in the copied run), 16
    # (no padding; eight-way bank conflicts in the layout step); O = 40 and 1000 end in a
    # partial K step of B's rows (40 rows copied of 64)
    pytest.param(40, (2, 4, 8), (2.0, 1.0, 0.5), id="O40-r14"),
    pytest.param(1000, (1, 2, 4), (1.0, 0.5, 0.25), id="O1000-r7"),
    pytest.param(1000, (4, 4, 8), (1.0, 2.0, 0.5), id="O1000-r16"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_routed_input_gradient_lays_out_b_for_any_rank(monkeypatch, o, ranks, scalings):
    """The routed input gradient bulk-copies each K step's rows of B as they are and lays them
    out on chip, zero-padded: odd and full ranks, and a last step of fewer rows, stay right."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    cfg = {"ranks": ranks, "scalings": scalings}
    inputs, dy = make_inputs(333, 104, o, cfg, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run("cuda", inputs, dy, cfg)
        torch.cuda.synchronize()
    assert _launches(prof, "routed_dgrad_kernel") == 1
    check_against_torch_and_fp64("cuda", 333, 104, o, cfg, torch.bfloat16, ulps=4)


def _run_with_shifted(name, inputs, dy):
    """One forward + backward with input `name` contiguous but 2 bytes past a 16-byte
    boundary (what TMA and bulk copies cannot read), profiled; the results are checked against
    torch and fp64 -> the profile."""
    t = inputs[name]
    shifted = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)[1:].view_as(t)
    shifted.copy_(t)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y, _, grads = run("cuda", {**inputs, name: shifted}, dy, {})
        torch.cuda.synchronize()
    y_t, _, grads_t = run("torch", inputs, dy, {})
    y_x, _, grads_x = run("torch", inputs, dy, {}, dtype=torch.float64)
    check("y", y, y_t, y_x, ulps=4)
    for grad in grads_x:
        check(grad, grads[grad], grads_t[grad], grads_x[grad], ulps=4)
    return prof


@pytest.mark.usefixtures("sm90_kernels")
def test_a_b_that_a_bulk_copy_cannot_read_takes_the_unrouted_input_gradient(monkeypatch):
    """B 2 bytes past a 16-byte boundary: the input gradient runs g and the routing on their
    own and dx on the sm_90a GEMM, and stays right."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    inputs, dy = make_inputs(333, 104, 40, {}, torch.bfloat16)
    prof = _run_with_shifted("lora_b", inputs, dy)
    assert _launches(prof, "routed_dgrad_kernel") == 0
    assert _launches(prof, "ext_gemm_kernel") == 1


@pytest.mark.parametrize("k, o, groups, routed", [
    pytest.param(768, 2304, 3, True, id="qkv-768-per-group"),
    pytest.param(104, 40, 1, True, id="K104-O40"),
    pytest.param(104, 48, 3, False, id="K104-O48-groups3-16-per-group"),
])
@pytest.mark.usefixtures("sm90_kernels")
def test_the_forward_routes_inside_the_gemm_where_a_tile_holds_one_group(monkeypatch, k, o,
                                                                          groups, routed):
    """The routed forward needs every 192-column tile inside one group; else the shrink, the
    routing and the sm_90a GEMM run one after the other. Both stay right."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    inputs, dy = make_inputs(333, k, o, {"groups": groups}, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        mor_linear_with_routing(*inputs.values(), ranks=RANKS, scalings=SCALINGS, bypass=True,
                                groups=groups, backend="cuda")
        torch.cuda.synchronize()
    assert _launches(prof, "routed_gemm_kernel") == int(routed)
    assert _launches(prof, "ext_gemm_kernel") == int(not routed)
    check_against_torch_and_fp64("cuda", 333, k, o, {"groups": groups}, torch.bfloat16, ulps=4)


def test_an_x_that_tma_cannot_load_takes_the_portable_forward_and_stays_right(monkeypatch):
    """x 2 bytes past a 16-byte boundary: the forward falls back to the portable kernels, and
    the input gradient to the unrouted one (the routed kernel loads x too, for d[A_cat; R]):
    dx, from dy and W in fresh buffers, on the sm_90a GEMM. The results stay right."""
    monkeypatch.delenv("EI_KERNELS_CUDA_SM90", raising=False)
    inputs, dy = make_inputs(333, 104, 40, {}, torch.bfloat16)
    prof = _run_with_shifted("x", inputs, dy)
    assert _launches(prof, "routed_gemm_kernel") == 0
    assert _launches(prof, "routed_dgrad_kernel") == 0
    assert _launches(prof, "ext_gemm_kernel") == (1 if _hopper_gemm_expected() else 0)


@pytest.mark.parametrize("keep", [True, False], ids=["kept-u", "recomputed-u"])
@pytest.mark.parametrize("groups", [1, 3])
def test_u_kept_from_the_forward_or_recomputed(monkeypatch, keep, groups):
    """The eager path keeps the forward's [u | l] when it fits the memory contract (one group)
    and the backward then skips recomputing u; forced either way, both stay right."""
    monkeypatch.setattr(torch_mor, "keeps_u", lambda spec: keep)
    check_against_torch_and_fp64("cuda", 1576, 768, 768 * groups, {"groups": groups},
                                 torch.bfloat16, ulps=4)


def _portable_gemm_launches(keep: bool, monkeypatch) -> int:
    monkeypatch.setattr(torch_mor, "keeps_u", lambda spec: keep)
    inputs, dy = make_inputs(256, 768, 768, {}, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run("cuda", inputs, dy, {})
        torch.cuda.synchronize()
    return _launches(prof, "portable")


def test_a_kept_u_saves_the_backward_its_u_gemm(monkeypatch):
    assert (_portable_gemm_launches(False, monkeypatch)
            == _portable_gemm_launches(True, monkeypatch) + 1)


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


def test_cuda_graph_capture_of_the_grouped_backward_s_dependent_launches():
    """Three groups of 256 outputs: u recomputed, the routed input gradient launched as the u
    GEMM's programmatic dependent and the sum as its: both dependencies captured."""
    check_cuda_graph_replay(make_layer("cuda", groups=3))


def test_torch_compile_fullgraph_forward_and_backward():
    check_compile_fullgraph(make_layer("cuda"))


def test_opcheck_on_cuda_tensors():
    """Schema, fake tensor and dispatch checks of the C++ ops with real kernels behind them."""
    cfg = {"groups": 3}
    inputs, dy = make_inputs(70, 100, 36, cfg, torch.bfloat16)
    args = (*inputs.values(), list(RANKS), list(SCALINGS), True, 3)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ei_kernels_cuda.mor_fwd.default, args, test_utils=tests)
    _, probs, shrink = torch.ops.ei_kernels_cuda.mor_fwd(*args)
    for kept in (None, shrink):
        bwd_args = (dy, inputs["x"], probs, inputs["weight"], inputs["lora_a"], inputs["lora_b"],
                    inputs["router_weight"], kept, list(RANKS), list(SCALINGS), True, 3, True)
        torch.library.opcheck(torch.ops.ei_kernels_cuda.mor_bwd.default, bwd_args,
                              test_utils=tests)
