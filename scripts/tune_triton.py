"""Offline checks and tuning of the Triton MoR launch tables (ei_kernels/ops/triton_configs.py).

    python scripts/tune_triton.py check [--arch sm90 sm80 sm86 sm89] [--ci]
                                        [--kernel fwd|bwd] [--groups 1|3]
        No GPU needed: compiles every table entry for each target (sm_90a; sm_80, sm_86 and
        sm_89 with the sm80 table, each against its own shared memory) the way
        a real call specialises it (ViT-B shapes, unit strides, 16-byte alignment) and reports,
        kernel by kernel, the MMA instructions of the PTX (wgmma / mma.sync), whether every
        main loop (one that carries an MMA accumulator) is software-pipelined, shared memory,
        registers and spills (ptxas), and how many programs fit on one SM. Fails on a compile
        error, a main loop that is not pipelined, spills over SPILL_LIMIT_BYTES, shared memory
        over the architecture's limit, or fewer programs per SM than the entry's
        programs_per_sm (what the launcher's schedule assumes). --ci: only the bf16 ViT-B
        forward and backward on sm_90a (G = 1, large), and any spill at all fails (about a
        minute on a 2-core CPU). --kernel / --groups: only those entries (a quick look at one
        kernel while changing it).

    python scripts/tune_triton.py tune [--out DIR]
        On a GPU: times candidate configs of every (kernel, dtype class, shape class) entry of
        this GPU's table at ViT-B shapes (median of CUDA-event timings after warm-up), prints
        the table with the winners and writes it to DIR/triton_configs_<arch>.json. Paste the
        printed lines into triton_configs.py; nothing reads the JSON at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from itertools import product

import torch

from ei_kernels.spec import MoRSpec

# Representative (tokens, K, O, groups) per shape class: ViT-B at batch 64 and at batch 8, a
# plain layer and qkv (groups=3 compiles another backward kernel: its group loop is unrolled).
SHAPES = {
    "large": [(12608, 768, 768, 1), (12608, 768, 2304, 3)],
    "small": [(1576, 768, 768, 1), (1576, 768, 2304, 3)],
}
DTYPES = {"16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
# Compiled target -> (the table a GPU of it uses, its shared memory per block in KiB). The
# sm80 table serves Ampere and Ada alike, so it must fit their 99 KiB as well as A100's 163.
TARGETS = {"sm90": ("sm90", 227), "sm80": ("sm80", 163), "sm86": ("sm86", 99),
           "sm89": ("sm86", 99), "sm75": ("sm75", 64)}
# Targets without asynchronous copies (before sm_80): their main loops cannot be pipelined, so
# the check does not ask for it there.
NO_ASYNC_COPY = {"sm75"}
# A few spilled registers in the backward's per-group epilogue cost little (they stay in L1);
# more than this means the tile is too big for the kernel.
SPILL_LIMIT_BYTES = 256
CAPABILITY = {"sm90": (9, 0), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm75": (7, 5)}
# Per SM (CUDA programming guide, compute capability tables): shared memory in KiB, resident
# threads, resident blocks; 64 Ki 32-bit registers everywhere, 1 KiB of shared memory reserved
# per block from sm_80 on.
SM_LIMITS = {"sm90": (228, 2048, 32), "sm80": (164, 2048, 32), "sm86": (100, 1536, 16),
             "sm89": (100, 1536, 24), "sm75": (64, 1024, 16)}


def programs_per_sm(arch: str, regs: int, smem_bytes: int, num_warps: int) -> int:
    """Blocks of a compiled kernel that fit on one SM at once: the least of what registers
    (allocated per warp in units of 256), shared memory and the thread and block limits
    allow."""
    smem_kib, threads, blocks = SM_LIMITS[arch]
    warp_regs = -(-regs * 32 // 256) * 256
    by_regs = (65536 // warp_regs) // num_warps
    reserved = 0 if arch == "sm75" else 1024
    by_smem = (smem_kib * 1024) // (smem_bytes + reserved) if smem_bytes else blocks
    return min(by_regs, by_smem, threads // (32 * num_warps), blocks)


def _inputs(shape, dtype, device):
    n, k, o, groups = shape
    spec = MoRSpec.build((2, 4, 8), (2.0, 2.0, 2.0), groups=groups)
    r, L = spec.rank, spec.num_logits

    def t(*s):
        return torch.randn(*s, device=device).to(dtype) * 0.05

    tensors = dict(x=t(n, k), weight=t(o, k), bias=t(o), lora_a=t(groups * r, k),
                   lora_b=t(o, r), router_weight=t(groups * L, k), router_bias=t(groups * L))
    probs = torch.softmax(torch.randn(n, groups * L, device=device), -1)
    return spec, tensors, probs, t(n, o)


def _call(tm, kernel, spec, tensors, probs, dy):
    """One launch as the autograd path makes it: where u fits the memory contract the forward
    stores it and the backward reads it (eager calls), else both go without."""
    from ei_kernels.ops.torch_mor import keeps_u

    keep = keeps_u(spec)
    if kernel == "fwd":
        tm.forward(*tensors.values(), spec, keep_u=keep)
    else:
        x = tensors["x"]
        u = torch.zeros(x.shape[0], spec.groups * spec.rank, device=x.device) if keep else None
        tm.backward(dy, x, probs, tensors["weight"], tensors["lora_a"], tensors["lora_b"],
                    tensors["router_weight"], spec, True, u=u)


# --------------------------------------------------------------------------------- check ----


class _Capture:
    """Stands in for a kernel: records the launch arguments instead of launching."""

    def __init__(self, jit_fn):
        self.jit_fn, self.launch = jit_fn, None

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launch = (args, dict(kwargs))
        return record


def _compile(jit_fn, args, kwargs, dtype, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    type_name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.int32: "i32"}
    options = dict(num_warps=kwargs.pop("num_warps"), num_stages=kwargs.pop("num_stages"))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jit_fn.arg_names):
        value = kwargs[name] if name in kwargs else args[i]
        if name in kwargs or (isinstance(value, int) and value == 1
                              and name not in jit_fn.do_not_specialize):
            signature[name], constexprs[name] = "constexpr", value  # as the JIT specialises 1
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + type_name[dtype if value.dtype == torch.float32 and
                                              name not in _FP32_BUFFERS else value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i64" if value >= 2 ** 31 else "i32"
            if value % 16 == 0 and name not in jit_fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    major, minor = CAPABILITY[arch]
    cap = major * 10 + minor
    compiled = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", cap, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([ptxas, f"-arch=sm_{cap}{'a' if cap == 90 else ''}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    ptx = compiled.asm["ptx"]
    mma = "+".join(kind for kind, op in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
                   if op in ptx) or "none"
    shared = compiled.metadata.shared
    return dict(smem=shared // 1024, regs=regs, spills=spills, mma=mma,
                loops=main_loop_report(compiled.asm["ttgir"]),
                per_sm=programs_per_sm(arch, regs, shared, options["num_warps"]))


def _loop_regions(ttgir: str) -> list[tuple[str, str]]:
    """(header line, body text) of every scf.for of the TTGIR, by brace matching."""
    lines, regions = ttgir.splitlines(), []
    for i, line in enumerate(lines):
        if "scf.for" not in line or "=" not in line.split("scf.for")[0]:
            continue
        depth, body = line.count("{") - line.count("}"), []
        for inner in lines[i + 1:]:
            depth += inner.count("{") - inner.count("}")
            if depth <= 0:
                break
            body.append(inner)
        regions.append((line, "\n".join(body)))
    return regions


def main_loop_report(ttgir: str) -> list[str]:
    """One verdict per main loop (an innermost loop that carries an fp32 MMA accumulator):
    "pipelined",
    or why not: a wait for every outstanding wgmma inside the loop (pendings = 0), or a 2-D
    operand loaded synchronously (tt.load) instead of by an asynchronous copy."""
    verdicts = []
    for header, body in _loop_regions(ttgir):
        results = header.split("->")[-1]
        if not re.search(r"xf32, #mma", results):
            continue  # no accumulator carried: not a main loop (e.g. the per-tile dB stores)
        if "scf.for" in body:
            # An outer loop (the backward's runtime group loop): Triton pipelines innermost
            # loops, which are judged on their own; its own loads run once per inner loop.
            continue
        reasons = []
        if re.search(r"warp_group_dot_wait .*\{pendings = 0 ", body):
            reasons.append("waits for all MMAs (pendings = 0)")
        sync = re.findall(r"%(\w+) = tt\.load [^\n]*: tensor<\d+x\d+x", body)
        if sync:
            reasons.append("synchronous 2-D loads: " + ", ".join(sorted(set(sync))))
        verdicts.append("NOT pipelined (" + "; ".join(reasons) + ")" if reasons else "pipelined")
    return verdicts


# Buffers that stay fp32 whatever the input dtype (the capture runs everything in fp32 on CPU).
_FP32_BUFFERS = ("p_ptr", "u_ptr", "col_scale_ptr", "part_ptr", "dar_ptr", "db_ptr", "dc_ptr")


def check(archs, ci: bool = False, kernels_only=("fwd", "bwd"), groups_only=(1, 3)) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    from ei_kernels.ops import triton_configs, triton_mor as tm

    kernels = {"fwd": _Capture(tm._mor_fwd_kernel), "bwd": _Capture(tm._mor_bwd_kernel)}
    tm._mor_fwd_kernel, tm._mor_bwd_kernel = kernels["fwd"], kernels["bwd"]
    tm._mor_slot_sum_kernel = _Capture(tm._mor_slot_sum_kernel)  # a plain sum: not checked
    failures = 0
    spill_limit = 0 if ci else SPILL_LIMIT_BYTES
    for arch in ["sm90"] if ci else archs:
        table, smem_limit = TARGETS[arch]
        for (kernel, dtype_class, shape_class), cfg in triton_configs.TABLES[table].items():
            if (ci and (dtype_class, shape_class) != ("16", "large")
                    or kernel not in kernels_only):
                continue
            for shape in SHAPES[shape_class][:1] if ci else SHAPES[shape_class]:
                if shape[3] not in groups_only:
                    continue
                tm.launch_config = lambda *a, cfg=cfg: cfg
                spec, tensors, probs, dy = _inputs(shape, torch.float32, "cpu")
                _call(tm, kernel, spec, tensors, probs, dy)
                args, kwargs = kernels[kernel].launch
                kwargs["DOT_PRECISION"] = "tf32" if dtype_class == "tf32" else "ieee"
                label = f"{arch} {kernel} {dtype_class:4s} {shape_class:5s} G={shape[3]} {cfg}"
                try:
                    # bf16 has no hardware path on Turing: fp16 is what runs there.
                    dtype = (torch.float16 if arch in NO_ASYNC_COPY and dtype_class == "16"
                             else DTYPES[dtype_class])
                    r = _compile(kernels[kernel].jit_fn, args, kwargs, dtype, arch)
                except Exception as e:  # report every entry, then fail
                    print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
                    failures += 1
                    continue
                unpipelined = [] if arch in NO_ASYNC_COPY else [
                    v for v in r["loops"] if v != "pipelined"]
                bad = (r["spills"] > spill_limit or r["smem"] > smem_limit
                       or bool(unpipelined) or r["per_sm"] < cfg.programs_per_sm)
                failures += bad
                print(f"{'FAIL' if bad else 'ok  '} {label}: {r['mma']}, main loops "
                      f"{'; '.join(r['loops']) or 'none'}, smem {r['smem']} KiB, "
                      f"{r['regs']} registers, {r['spills']} B spilled, {r['per_sm']} per SM "
                      f"(table: {cfg.programs_per_sm})", flush=True)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------- tune ----

# (block_m, block_n, block_k, num_warps, num_stages).
CANDIDATES = {
    "16": list(product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4))),
    "tf32": list(product((64, 128), (64, 128), (32,), (4, 8), (3,))),
    "fp32": list(product((32, 64, 128), (32, 64), (16,), (4, 8), (3,))),
}


def _time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tune(out_dir) -> int:
    from ei_kernels.ops import triton_configs, triton_mor as tm

    arch = triton_configs.arch_name(torch.cuda.get_device_capability())
    table = dict(triton_configs.TABLES[arch])
    for (kernel, dtype_class, shape_class), current in table.items():
        torch.backends.cuda.matmul.allow_tf32 = dtype_class == "tf32"
        spec, tensors, probs, dy = _inputs(SHAPES[shape_class][0], DTYPES[dtype_class], "cuda")
        results = []
        for bm, bn, bk, warps, stages in CANDIDATES[dtype_class]:
            cfg = triton_configs.KernelConfig(bm, bn, bk, warps, stages)
            tm.launch_config = lambda *a, cfg=cfg: cfg
            try:
                ms = _time_ms(lambda: _call(tm, kernel, spec, tensors, probs, dy))
            except Exception:  # out of shared memory or registers on this GPU
                continue
            results.append((ms, cfg))
        best_ms, best = min(results, key=lambda r: r[0])
        tm.launch_config = lambda *a, cfg=current: cfg
        current_ms = _time_ms(lambda: _call(tm, kernel, spec, tensors, probs, dy))
        table[(kernel, dtype_class, shape_class)] = best
        print(f"    {(kernel, dtype_class, shape_class)!r}: _C({best.block_m}, {best.block_n}, "
              f"{best.block_k}, {best.num_warps}, {best.num_stages}),  # {best_ms:.3f} ms, "
              f"table had {current_ms:.3f} ms", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"triton_configs_{arch}.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "table": [[*key, vars(cfg)] for key, cfg in table.items()]}, f, indent=1)
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="compile every table entry (no GPU needed)")
    p_check.add_argument("--arch", nargs="+", default=list(CAPABILITY), choices=CAPABILITY)
    p_check.add_argument("--ci", action="store_true",
                         help="bf16 ViT-B forward and backward on sm_90a only; no spill allowed")
    p_check.add_argument("--kernel", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p_check.add_argument("--groups", nargs="+", type=int, default=[1, 3], choices=[1, 3])
    p_tune = sub.add_parser("tune", help="time candidate configs on this GPU")
    p_tune.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.command == "check":
        return check(args.arch, args.ci, args.kernel, args.groups)
    if not torch.cuda.is_available():
        print("tune needs a CUDA GPU", file=sys.stderr)
        return 2
    return tune(args.out)


if __name__ == "__main__":
    sys.exit(main())
