"""ei plan: the step memory worked out on fake tensors equals what a real step on the CPU keeps
for backward (same model, batch and precision), and the planner's arithmetic."""

from __future__ import annotations

import pytest
import torch

from ei.plan import StepMemory, parse_memory, plan, saved_tensor_bytes, step_memory
from ei.train.config import ConfigError, load_config
from ei.train.data import resolve_preset
from ei.train.inference import autocast
from ei.train.models import build_model, build_task
from micro_run import MICRO, write_micro_config


def _real_saved_bytes(config, stage, precision, batch, swap_layers=None):
    """What a real forward on the CPU saves for backward (parameters excluded)."""
    preset = resolve_preset(config)
    torch.manual_seed(0)
    model = build_model(config, preset, stage, with_weights=False)
    if swap_layers is not None:
        swap_layers(model)
    task = build_task(config, preset, stage, best_modality=preset.modalities[0])
    size = config.image_size
    data = {m: torch.rand(batch, preset.images_per_modality, 3, size, size)
            for m in preset.modalities}
    data["label"] = torch.zeros(batch, dtype=torch.long)
    with saved_tensor_bytes(model.parameters()) as saved, \
            autocast(torch.device("cpu"), precision):
        task.loss(model, data)
    return sum(saved.values())


@pytest.mark.parametrize("stage", ["single/locator", "ei"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fake_step_saves_what_a_real_step_saves(tmp_path, stage, precision, checkpointing):
    config = load_config(write_micro_config(tmp_path, tmp_path / "data"),
                         [f"model.grad_checkpointing={str(checkpointing).lower()}"])
    planned = step_memory(config, stage, precision, batch=4)
    real = _real_saved_bytes(config, stage, precision, batch=4)
    assert planned.activations == pytest.approx(real, rel=0.10), (planned.activations, real)
    trainable = sum(p.numel() for p in build_model(config, resolve_preset(config), stage,
                                                   with_weights=False).parameters()
                    if p.requires_grad)
    assert planned.optimizer == 8 * trainable  # fp32 gradient + momentum


def test_the_authors_eager_layers_are_counted_as_a_real_step_keeps_them(tmp_path):
    # benchmarks/plan_eager.py swaps in the eager baseline this way; it must count right too.
    from benchmarks.eager_mor import to_eager

    config = load_config(write_micro_config(tmp_path, tmp_path / "data"))
    planned = step_memory(config, "ei", "fp32", batch=4, swap_layers=to_eager)
    real = _real_saved_bytes(config, "ei", "fp32", batch=4, swap_layers=to_eager)
    assert planned.activations == pytest.approx(real, rel=0.10), (planned.activations, real)
    fused = step_memory(config, "ei", "fp32", batch=4)
    assert planned.activations > fused.activations  # every branch's N x O output is kept


def test_plan_rows_and_largest_batch(tmp_path):
    config = load_config(write_micro_config(tmp_path, tmp_path / "data"))
    rows = plan(config)
    assert [(r.stage, r.precision, r.checkpointing) for r in rows[:3]] == [
        ("single/locator", p, False) for p in ("fp32", "bf16", "fp16")]
    assert len(rows) == 12 and all(r.batch == MICRO["single"]["batch_size"] for r in rows)
    row = StepMemory("ei", "bf16", False, batch=8, weights=100, optimizer=20, activations=800,
                     workspace=0, blocks=4)
    assert row.peak == 920 and row.largest_batch(1120) == 10 and row.largest_batch(50) == 0


def test_memory_sizes_parse_and_bad_ones_name_the_option():
    assert parse_memory("16GB") == parse_memory("16 GiB") == 16 * 2 ** 30
    assert parse_memory("24000MB") == 24000 * 2 ** 20
    for bad in ("lots", "0GB", "1.2.3G", "-5GB"):  # 0 would drop the column without a word
        with pytest.raises(ConfigError, match="--gpu-memory: expected a size above 0"):
            parse_memory(bad)


def test_a_fake_run_neither_uses_nor_leaves_cached_constants():
    # The op caches its branch matrix per (spec, device, dtype); a plan in between real runs
    # must not mix fake and real tensors either way.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from ei_kernels.ops.torch_mor import branch_matrix
    from ei_kernels.spec import MoRSpec

    spec = MoRSpec.build((2, 4), (1.0, 0.5))
    real = branch_matrix(spec, torch.device("cpu"), torch.float32)
    with FakeTensorMode():
        fake = branch_matrix(spec, torch.device("cpu"), torch.float32)
    assert isinstance(fake, FakeTensor) and not isinstance(real, FakeTensor)
    assert branch_matrix(spec, torch.device("cpu"), torch.float32) is real
