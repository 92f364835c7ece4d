"""One EI training step (M=2, I=1, batch 8): authors-style eager MoR layers vs our fused layers.

GPU (when present): the paper's setting, DINOv2 ViT-B/14 at 448 px, bf16 autocast; peak memory
is torch.cuda.max_memory_allocated over one step (weights, gradients and SGD state included);
a last case adds activation checkpointing to the default fused backend.
CPU: fp32, a ViT-S-like backbone (384 wide, 6 blocks, patch 16) at 96 px; the memory figure is
the bytes of the tensors autograd saves for backward in one forward (unique storages, frozen
weights excluded): the activation memory a step holds at its peak, not the process RSS.
EI_BENCH_QUICK=1: a toy size and 2 rounds, to check that the benchmark runs.

    pytest benchmarks/test_bench_ei_step.py --benchmark-columns=mean,median,min
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from benchmarks.eager_mor import to_eager
from ei.model import BackboneConfig, EIConfig, EIModel, ei_loss
from ei_kernels import FusedMoRLinear, available_backends

QUICK = os.environ.get("EI_BENCH_QUICK") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, CLASSES = 8, 4
if DEVICE.type == "cuda" and not QUICK:
    IMG, BACKBONE = 448, BackboneConfig("dinov2", 448)
else:
    IMG = 32 if QUICK else 96
    dims = dict(embed_dim=64, depth=2, num_heads=2) if QUICK else dict(embed_dim=384, depth=6,
                                                                        num_heads=6)
    BACKBONE = BackboneConfig("dinov2", IMG, timm_kwargs=dict(dims, patch_size=16, init_values=1.0))
ROUNDS = 2 if QUICK else 5
# The Triton interpreter on CPU is a correctness tool, far too slow to time a model with.
BACKENDS = [b for b in available_backends(DEVICE) if not (DEVICE.type == "cpu" and b == "triton")]
IMPLS = ["eager", *BACKENDS]
if DEVICE.type == "cuda":
    # Activation checkpointing, for cards with less memory: the cost in time of the saving.
    IMPLS.append("auto+checkpointing")
_times: dict[str, tuple[float, float]] = {}  # impl -> (median, min) step seconds

pytestmark = pytest.mark.benchmark(group=f"ei_step_{DEVICE.type}", warmup=False)


def saved_activation_bytes(step_forward) -> int:
    """Bytes autograd keeps for backward during `step_forward()` (unique storages, parameters
    excluded); the graph is released before returning."""
    params = set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model, loss = step_forward()
        params.update(p.untyped_storage().data_ptr() for p in model.parameters())
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("impl", IMPLS)
def test_ei_train_step(benchmark, impl):
    torch.manual_seed(0)
    backend, _, checkpointing = impl.partition("+")
    backbone = replace(BACKBONE, grad_checkpointing=bool(checkpointing))
    config = EIConfig(("a", "b"), CLASSES, backbone=backbone)
    with torch.device(DEVICE):
        model = EIModel(config)
    g = torch.Generator().manual_seed(1)
    images = {m: torch.randn(BATCH, 1, 3, IMG, IMG, generator=g).to(DEVICE) for m in ("a", "b")}
    target = torch.randint(0, CLASSES, (BATCH,), generator=g).to(DEVICE)
    autocast = torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")

    def forward():
        with autocast:
            return model, ei_loss(model(images), target)[0]

    if impl == "eager":
        with torch.no_grad():
            fused_loss = forward()[1]
        to_eager(model)
        with torch.no_grad():  # same weights, same loss: the swap is faithful
            torch.testing.assert_close(forward()[1], fused_loss, rtol=2e-2, atol=2e-2)
    else:
        for layer in model.modules():
            if isinstance(layer, FusedMoRLinear):
                layer.backend = backend
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.95, weight_decay=1e-4)

    def step():
        forward()[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation, autotuning, SGD state
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated()}
    else:
        memory = {"saved_activation_bytes": saved_activation_bytes(forward)}
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)

    info = dict(impl=impl, device=str(DEVICE), img=IMG, batch=BATCH, quick=QUICK,
                dtype="bf16 autocast" if DEVICE.type == "cuda" else "fp32",
                trainable_params=sum(p.numel() for p in trainable), **memory,
                # Other jobs on the machine distort CPU timings: keep the context with them.
                threads=torch.get_num_threads(), load_average_1min=os.getloadavg()[0])
    if benchmark.stats is not None:
        stats = benchmark.stats.stats
        _times[impl] = (stats.median, stats.min)
        if impl != "eager" and "eager" in _times:
            # The minimum too: on a shared CPU, other jobs inflate medians unevenly.
            info["speedup_vs_eager"] = _times["eager"][0] / stats.median
            info["speedup_vs_eager_min"] = _times["eager"][1] / stats.min
    benchmark.extra_info.update(info)
