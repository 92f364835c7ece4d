"""Layer-level benchmark: MoR providers vs the frozen nn.Linear floor, forward and
forward+backward, plus the bytes each keeps for backward. Run: `pytest benchmarks/`."""

import pytest
import torch

from .harness import Timer, bench_device, quick_mode, saved_activation_bytes
from .layer_providers import build, layer_shapes, layer_step, provider_names

DEVICE = bench_device()
QUICK = quick_mode()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS, WARMUP = (1, 1) if QUICK else ((50, 10) if DEVICE.type == "cuda" else (15, 3))


def _shape_id(shape):
    k, o, g, n = shape
    return f"K{k}-O{o}{'-qkv' if g == 3 else ''}-N{n}"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", provider_names(DEVICE))
@pytest.mark.parametrize("shape", layer_shapes(DEVICE, QUICK), ids=_shape_id)
def test_layer(benchmark, bench_results, shape, provider, mode):
    k, o, groups, n = shape
    layer = build(provider, k, o, groups, DEVICE, DTYPE)
    x = torch.randn(n, k, device=DEVICE, dtype=DTYPE, requires_grad=(mode == "fwd+bwd"))
    dy = torch.randn(n, o, device=DEVICE, dtype=DTYPE)

    timer = Timer(layer_step(layer, x, dy, mode), DEVICE, WARMUP)
    benchmark.pedantic(timer, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    saved = None
    if mode == "fwd+bwd" and provider != "compiled-eager":  # hooks do not see inside a graph
        saved = saved_activation_bytes(lambda: layer(x), layer.parameters())
    record = dict(shape=_shape_id(shape), k=k, o=o, groups=groups, n=n, provider=provider,
                  mode=mode, dtype=str(DTYPE).removeprefix("torch."),
                  median_ms=timer.median_ms(), min_ms=timer.min_ms(), saved_bytes=saved,
                  x_bytes=x.numel() * x.element_size())
    benchmark.extra_info.update(record)
    bench_results.append(record)
