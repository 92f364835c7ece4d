"""Correctness smoke of one backend: one JSON line per case in correctness.jsonl.

Each case runs the fused op forward + backward and the independent reference
(tests/mor_reference.py, plain PyTorch, one branch at a time) twice: in the case's precision
("PyTorch's error") and in fp64 ("exact"). Errors are norm-wise, ||ours - exact|| / ||exact||,
for y, the router probabilities and every gradient. Verdict "pass" when every output has the
expected shape and dtype, is finite, and ours <= 2 * PyTorch's + 8 fp32 ulps. The floor: the
kernels accumulate in fp32 along the fused algebra's association (dp = (g * u) S^T), not the
reference's; in fp32 that alone costs a few ulps where PyTorch happens to round well (the dry
run's d_router_bias: 4.3 ulps from Triton, 3.9 from our torch backend, 1.3 from PyTorch).

    python scripts/gpu_check/correctness.py --backend triton|cuda [--case-seconds 60]

Cases are ordered most informative first (bf16 at ViT-B sizes, then the other precisions,
flags, odd shapes, N = 1 and 0); a case already in the file is skipped, so a restarted stage
goes on where the last one died. The cuda backend's cases run one step down the ladder "1"
(every sm_90a kernel, persistent, the routed forward in clusters of 2 CTAs walking its tiles
in runs where it does by default, the backward's sum launched as the routed input gradient's
programmatic dependent), "no-cluster" (the same, one CTA per cluster, the tiles round-robin,
the sum launched after the routed input gradient), "one-tile" (the same kernels, one CTA per
tile), "unfolded" (the same, d[A_cat; R] on a launch of its own, not in the routed input
gradient), "unrouted" (the plain sm_90a GEMM, one CTA per tile), "0" (the portable kernels
only) for each mode
under which a case hung, crashed or lost the CUDA context, so that one broken kernel family
costs one watchdog period, not the whole budget; each record says its mode ("sm90"), SM90_ENV
the environment it sets. In dry mode the shapes are tiny, bf16 runs as fp16 and tf32
as fp32 (the interpreter has neither).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from common import CONTEXT_LOST, DRY, device, read_records, run_case, synchronize

import torch  # noqa: E402  (after common: it sets sys.path)

from ei_kernels import mor_linear_with_routing  # noqa: E402
from mor_reference import make_inputs, reference_mor  # noqa: E402

FILE = "correctness.jsonl"
SM90_LADDER = ("1", "no-cluster", "one-tile", "unfolded", "unrouted", "0")  # most sm_90a first
SM90_SWITCHES = ("EI_KERNELS_CUDA_SM90", "EI_KERNELS_CUDA_SM90_PERSISTENT",
                 "EI_KERNELS_CUDA_SM90_CLUSTER", "EI_KERNELS_CUDA_SM90_RUNS", "EI_KERNELS_CUDA_PDL")
SM90_ENV = {  # the values of SM90_SWITCHES in each mode ("" for a switch's default)
    "1": ("1", "1", "2", "", "1"), "no-cluster": ("1", "1", "1", "0", "0"),
    "one-tile": ("1", "0", "1", "0", "0"), "unfolded": ("unfolded", "0", "1", "0", "0"),
    "unrouted": ("unrouted", "0", "1", "0", "0"), "0": ("0", "0", "1", "0", "0")}
RANKS, SCALINGS = (2, 4, 8), (2.0, 1.0, 0.5)  # distinct scalings catch a mis-weighted column
TRAINABLE = ("x", "lora_a", "lora_b", "router_weight", "router_bias")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "tf32": torch.float32}


@dataclass(frozen=True)
class Case:
    id: str
    n: int
    k: int
    o: int
    dtype: str
    cfg: dict = field(default_factory=dict)  # groups, bypass, router, bias, no_dx, non_contiguous

    def for_dry_run(self) -> "Case":
        groups = self.cfg.get("groups", 1)
        n = min(self.n, 33)
        k, o = (self.k, self.o) if self.k <= 100 else (40, 12 * groups)
        dtype = {"bf16": "fp16", "tf32": "fp32"}.get(self.dtype, self.dtype)
        return Case(self.id, n, k, o, dtype, self.cfg)


CASES = [
    Case("vitb-fc1-bf16", 1576, 768, 3072, "bf16"),
    Case("vitb-qkv-groups3-bf16", 1576, 768, 2304, "bf16", {"groups": 3}),
    Case("vitb-fc2-12608-bf16", 12608, 3072, 768, "bf16"),
    # large layers run programs of several column tiles; qkv also recomputes u in them
    Case("vitb-qkv-groups3-12608-bf16", 12608, 768, 2304, "bf16", {"groups": 3}),
    Case("vitb-768-fp16", 1576, 768, 768, "fp16"),
    Case("vitb-768-fp32", 1576, 768, 768, "fp32"),
    Case("vitb-768-tf32", 1576, 768, 768, "tf32"),
    Case("no-bypass-bf16", 1576, 768, 768, "bf16", {"bypass": False}),
    Case("plain-lora-bf16", 1576, 768, 768, "bf16", {"router": False}),
    Case("no-bias-bf16", 1576, 768, 768, "bf16", {"bias": False}),
    Case("no-dx-bf16", 1576, 768, 768, "bf16", {"no_dx": True}),
    Case("non-contiguous-fp16", 1576, 768, 768, "fp16", {"non_contiguous": True}),
    Case("odd-K100-O37-bf16", 333, 100, 37, "bf16"),
    Case("odd-K100-O36-groups3-fp16", 333, 100, 36, "fp16", {"groups": 3}),
    Case("odd-K100-O36-groups3-lora-fp32", 333, 100, 36, "fp32", {"groups": 3, "router": False}),
    Case("one-token-bf16", 1, 100, 37, "bf16"),
    Case("one-token-groups3-fp32", 1, 768, 768, "fp32", {"groups": 3}),
    Case("no-tokens-groups3-bf16", 0, 100, 36, "bf16", {"groups": 3}),
    Case("vitb-fc1-12608-bf16", 12608, 768, 3072, "bf16"),
]


def reference_probs(x, router_weight, router_bias, groups, bypass):
    """softmax(x R_g^T + c_g) per group, [N, groups * L] (empty without a router)."""
    if router_weight is None:
        return x.new_zeros(x.shape[0], 0)
    logits = x @ router_weight.t() + (router_bias if router_bias is not None else 0)
    n_logits = len(RANKS) + int(bypass)
    return torch.softmax(logits.view(-1, groups, n_logits), dim=-1).flatten(1)


def _leaves(inputs, dtype, cfg):
    leaves = {}
    for name, v in inputs.items():
        if v is not None:
            v = v.detach().to(dtype)
            if cfg.get("non_contiguous") and name in ("x", "weight"):
                v = v.t().contiguous().t()  # column-major
            v.requires_grad_(name in TRAINABLE and not (name == "x" and cfg.get("no_dx")))
        leaves[name] = v
    return leaves


def _outputs(y, probs, leaves):
    out = {"y": y.detach(), "probs": probs.detach().flatten(1)}  # ours: [N, G, L]
    for name in TRAINABLE:
        leaf = leaves[name]
        if leaf is not None and leaf.requires_grad:
            out[f"d_{name}"] = leaf.grad
    return out


def run_reference(inputs, dy, dtype, cfg):
    leaves = _leaves(inputs, dtype, cfg)
    groups, bypass = cfg.get("groups", 1), cfg.get("bypass", True)
    y = reference_mor(*leaves.values(), ranks=RANKS, scalings=SCALINGS, bypass=bypass,
                      groups=groups)
    probs = reference_probs(leaves["x"], leaves["router_weight"], leaves["router_bias"], groups,
                            bypass)
    y.backward(dy.to(dtype))
    return _outputs(y, probs, leaves)


def run_ours(backend, inputs, dy, dtype, cfg):
    leaves = _leaves(inputs, dtype, cfg)
    y, probs = mor_linear_with_routing(
        *leaves.values(), ranks=RANKS, scalings=SCALINGS, bypass=cfg.get("bypass", True),
        groups=cfg.get("groups", 1), backend=backend)
    dy = dy.to(dtype)
    y.backward(dy.t().contiguous().t() if cfg.get("non_contiguous") else dy)
    return _outputs(y, probs, leaves)


def relative_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = torch.linalg.vector_norm(a.double() - exact).item()
    scale = torch.linalg.vector_norm(exact).item()
    return diff / scale if scale > 0 else diff


def compare(ours, torch_lp, exact):
    """Per output: errors, limit and whether it holds; plus a list of what failed."""
    floor = 8 * torch.finfo(torch.float32).eps
    report, failed = {}, []
    for name, want in exact.items():
        got, ref = ours.get(name), torch_lp[name]
        if got is None:
            failed.append(f"{name}: missing")
            continue
        entry = {"shape": list(got.shape)}
        if got.shape != want.shape:
            failed.append(f"{name}: shape {list(got.shape)}, expected {list(want.shape)}")
        elif not torch.isfinite(got).all():
            failed.append(f"{name}: non-finite values (an element never written?)")
        else:
            e_ours, e_torch = relative_error(got, want), relative_error(ref, want)
            limit = 2 * e_torch + floor
            entry.update(ours=e_ours, torch=e_torch, limit=limit)
            if e_ours > limit:
                failed.append(f"{name}: {e_ours:.3g} > {limit:.3g}")
        expected_dtype = torch.float32 if name == "probs" else ref.dtype
        if got.dtype != expected_dtype:
            failed.append(f"{name}: dtype {got.dtype}, expected {expected_dtype}")
        report[name] = entry
    return report, failed


def poison_caching_allocator():
    """NaN in the caching allocator's free blocks, so an element a kernel never writes reads
    as NaN rather than as a stale, possibly right value (the CUDA backend; Triton has its own
    POISON_OUTPUTS switch)."""
    if DRY:
        return
    blocks = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]
    blocks.append(torch.full((256 << 20,), float("nan"), device="cuda"))
    del blocks


def check_case(backend: str, case: Case) -> dict:
    dtype = DTYPES[case.dtype]
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "tf32"  # ours and PyTorch alike
    cfg = case.cfg
    inputs = make_inputs((case.n,), case.k, case.o, ranks=RANKS, bypass=cfg.get("bypass", True),
                         router=cfg.get("router", True), groups=cfg.get("groups", 1),
                         bias=cfg.get("bias", True), dtype=torch.float64, seed=0)
    dev = device()
    inputs = {k: (v.to(dev) if v is not None else None) for k, v in inputs.items()}
    dy = torch.randn(case.n, case.o, generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to(dev)
    exact = run_reference(inputs, dy, torch.float64, cfg)
    torch_lp = run_reference(inputs, dy, dtype, cfg)
    poison_caching_allocator()
    t0 = time.perf_counter()
    ours = run_ours(backend, inputs, dy, dtype, cfg)
    synchronize()
    first_call_s = time.perf_counter() - t0  # compilation included on a first specialisation
    report, failed = compare(ours, torch_lp, exact)
    return dict(outputs=report, failed=failed, first_call_s=round(first_call_s, 3),
                verdict="FAIL" if failed else "pass")


def sm90_mode(records: list[dict]) -> str:
    """The SM90_LADDER mode for the cuda cases still to run: past every mode at the top of the
    ladder under which a case never finished (hung or crashed: "started" and nothing after
    it) or lost the CUDA context."""
    finished = {r["case"] for r in records
                if r.get("backend") == "cuda" and r.get("verdict") != "started"}
    bad = {r.get("sm90") for r in records if r.get("backend") == "cuda" and (
        r.get("context_lost") or (r.get("verdict") == "started" and r["case"] not in finished))}
    level = 0
    while level < len(SM90_LADDER) - 1 and SM90_LADDER[level] in bad:
        level += 1
    return SM90_LADDER[level]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=("triton", "cuda"))
    parser.add_argument("--case-seconds", type=float, default=90.0,
                        help="watchdog per case (compilation included)")
    args = parser.parse_args()
    if args.backend == "triton":
        from ei_kernels.ops import triton_mor

        triton_mor.POISON_OUTPUTS = True
    records = read_records(FILE)
    done = {r["case"] for r in records if r.get("backend") == args.backend}
    mode = {}
    if args.backend == "cuda":  # the extension reads the switch at every call
        mode = {"sm90": sm90_mode(records)}
        switches = dict(zip(SM90_SWITCHES, SM90_ENV[mode["sm90"]]))
        os.environ.update(switches)
        print("cuda cases run with " + " ".join(f"{k}={v}" for k, v in switches.items()),
              flush=True)
    for case in CASES:
        if case.id in done:
            continue
        run = case.for_dry_run() if DRY else case
        base = dict(stage="correctness", backend=args.backend, case=case.id, n=run.n, k=run.k,
                    o=run.o, dtype=run.dtype, cfg=run.cfg, **mode)
        result, lost = run_case(FILE, base, lambda: check_case(args.backend, run),
                                args.case_seconds, started={"verdict": "started"},
                                failed={"verdict": "error"})
        print(f"{args.backend:6s} {case.id:34s} {result['verdict']:5s} {result['seconds']:7.1f} s"
              f"  {'; '.join(result.get('failed', [])) or result.get('error', '')}", flush=True)
        if lost:
            print("CUDA context lost: the stage restarts in a new process", flush=True)
            return CONTEXT_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
