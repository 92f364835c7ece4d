"""`ei plan` against real training steps: one JSON line per case in plan_memory.jsonl.

Each case is a stage of the paper's MMC-AMD setting (448 px, batch 8, bf16; random weights, so
nothing is downloaded), with and without activation checkpointing: the peak `ei plan` predicts
next to torch.cuda.max_memory_allocated() over two real SGD steps of the same model, counted
from an emptied allocator. Neither counts the CUDA context.

    python scripts/gpu_check/plan_memory.py [--case-seconds 60]

Dry mode: the synthetic demo's tiny model on the CPU; the plan's figures only (a CPU has no
allocator statistics to compare with).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from common import CONTEXT_LOST, DRY, ROOT, device, read_records, run_case, synchronize

import torch  # noqa: E402

from ei.plan import step_memory  # noqa: E402
from ei.train.config import load_config  # noqa: E402
from ei.train.data import resolve_preset  # noqa: E402
from ei.train.inference import autocast  # noqa: E402
from ei.train.models import build_model, build_task, stage_names  # noqa: E402

FILE = "plan_memory.jsonl"
PRECISION = "fp32" if DRY else "bf16"
BATCH = 2 if DRY else 8
GiB = 2 ** 30


def _config(checkpointing: bool):
    if DRY:
        config = load_config(ROOT / "configs" / "synthetic.yaml",
                             ["model.synthetic_pretraining=null", "runtime.progress=false"])
    else:
        config = load_config(ROOT / "configs" / "mmc_amd.yaml",
                             ["data.root=/nonexistent", "model.pretrained=false"])
    model = dataclasses.replace(config.model, grad_checkpointing=checkpointing)
    return dataclasses.replace(config, model=model)


def _batch(config, preset, dev: torch.device) -> dict:
    size = config.image_size
    batch = {m: torch.randn(BATCH, preset.images_per_modality, 3, size, size, device=dev)
             for m in preset.modalities}
    shape = (BATCH, preset.num_classes) if preset.multi_label else (BATCH,)
    batch["label"] = (torch.ones(shape, device=dev) if preset.multi_label
                      else torch.zeros(shape, dtype=torch.long, device=dev))
    return batch


def measured_peak(config, stage: str) -> int:
    """Bytes allocated at the peak of building the model and two SGD steps, beyond what was
    allocated before."""
    dev = device()
    preset = resolve_preset(config)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = build_model(config, preset, stage, with_weights=False).to(dev)
    task = build_task(config, preset, stage, best_modality=preset.modalities[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                momentum=0.9)
    batch = _batch(config, preset, dev)
    for _ in range(2):
        with autocast(dev, PRECISION):
            loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model, optimizer, batch, loss
    torch.cuda.empty_cache()
    return peak


def compare(config, stage: str) -> dict:
    planned = step_memory(config, stage, PRECISION, BATCH)
    return dict(planned_bytes=planned.peak, planned_activations_bytes=planned.activations,
                planned_fixed_bytes=planned.fixed,
                measured_bytes=None if DRY else measured_peak(config, stage))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case-seconds", type=float, default=60.0)
    args = parser.parse_args()
    done = {(r.get("stage"), r.get("checkpointing")) for r in read_records(FILE)}
    for checkpointing in (False, True):
        config = _config(checkpointing)
        for stage in (stage_names(config, resolve_preset(config))[0], "ei"):
            if (stage, checkpointing) in done:
                continue
            base = dict(stage=stage, checkpointing=checkpointing, precision=PRECISION,
                        batch=BATCH, image_size=config.image_size)
            result, lost = run_case(FILE, base, lambda: compare(config, stage),
                                    args.case_seconds)
            if "error" in result:
                shown = result["error"]
            else:
                measured = result["measured_bytes"]
                shown = (f"planned {result['planned_bytes'] / GiB:.2f} GiB, measured "
                         + ("-" if measured is None else f"{measured / GiB:.2f} GiB"))
            print(f"{stage:16s} checkpointing={checkpointing!s:5s} {shown}", flush=True)
            if lost:
                return CONTEXT_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
