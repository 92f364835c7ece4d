"""`ei plan`'s memory of one training step at the paper's three settings, with our fused MoR
layers and with the authors-style eager layers (benchmarks/eager_mor.py) in their place: worked
out on fake tensors (ei/plan.py), not measured on a GPU.

    python -m benchmarks.plan_eager [--gpu-memory 16GB] [--precision bf16]

Prints a markdown table (BENCHMARKS.md holds its output).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.eager_mor import to_eager
from ei.plan import MiB, parse_memory, plan
from ei.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("mmc_amd", "derm7pt", "mrnet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", default="16GB")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args()
    limit = parse_memory(args.gpu_memory)
    print(f"| config | stage | layers | checkpointing | activations MiB | peak GiB at batch 8 | "
          f"largest batch in {limit / 2 ** 30:g} GiB |")
    print("|---|---|---|---|---|---|---|")
    for name in DATASETS:
        # A data root is required but never read: the models are built on the meta device.
        config = load_config(CONFIGS / f"{name}.yaml", ["data.root=/nonexistent",
                                                        "model.pretrained=false"])
        rows = {layers: plan(config, precisions=(args.precision,), swap_layers=swap)
                for layers, swap in (("fused", None), ("eager", to_eager))}
        for fused, eager in zip(rows["fused"], rows["eager"]):
            for layers, r in (("fused", fused), ("eager", eager)):
                print(f"| {name} | {r.stage} | {layers} | {'yes' if r.checkpointing else 'no'} | "
                      f"{r.activations / MiB:.0f} | {r.peak / 2 ** 30:.1f} | "
                      f"{r.largest_batch(limit)} |")


if __name__ == "__main__":
    main()
