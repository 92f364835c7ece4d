"""``ei plan``: the memory of one training step of each stage, worked out without running the
model, and the largest batch that fits a given GPU memory.

Each stage's model is built and run forward under PyTorch's FakeTensorMode: tensors carry
shapes and dtypes but no storage, so a ViT-B at 448 px costs nothing to "run". Autocast is
applied as the CPU implements it (matmuls in bf16/fp16, norms and softmax in fp32), which
matches CUDA's autocast for the layers of a ViT. A saved-tensor hook counts every tensor
autograd keeps for backward (parameters excluded, shared storages once), which is what the
activation memory of a step is. Counted per stage:

- weights: every parameter, fp32 (the backbones are stored in fp32 under autocast);
- gradients and optimizer state: one fp32 copy each of the trainable parameters (SGD with
  momentum);
- activations: what the forward saves for backward at this batch size;
- workspace: twice the largest saved tensor, standing for the transient gradients of the
  backward, plus, with activation checkpointing, one block's activations (the backward
  recomputes one block at a time): an estimate, the one part not counted exactly.

It does not count the CUDA context (about 0.5 GB on the card) or allocator fragmentation. The
op runs its torch backend on these tensors; the Triton backend keeps about as much per token
(x, p and u, at most 32 values: the op's memory contract).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ei.train.config import Config, ConfigError
from ei.train.data import resolve_preset
from ei.train.inference import autocast
from ei.train.models import SINGLE_PREFIX, build_model, build_task, stage_names

PRECISIONS = ("fp32", "bf16", "fp16")
MiB = 2 ** 20


@dataclasses.dataclass
class StepMemory:
    stage: str
    precision: str
    checkpointing: bool
    batch: int
    weights: int
    optimizer: int  # gradients + momentum
    activations: int
    workspace: int
    blocks: int  # transformer blocks in the stage's model, all backbones together

    @property
    def fixed(self) -> int:
        return self.weights + self.optimizer

    @property
    def peak(self) -> int:
        return self.fixed + self.activations + self.workspace

    def largest_batch(self, limit: int) -> int:
        """Batch size whose peak stays within `limit` bytes (activations scale with it)."""
        per_sample = (self.activations + self.workspace) / self.batch
        return max(0, math.floor((limit - self.fixed) / per_sample)) if per_sample else 0


def parse_memory(text: str) -> int:
    """'16GB', '16 GiB', '12.5G', '24000MB' -> bytes (GB read as GiB, as cards are sold)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([GM])i?B?\s*", text, re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory: expected a size above 0 such as 16GB or 24000MB, "
                          f"got {text!r}")
    scale = 2 ** 30 if found.group(2).upper() == "G" else MiB
    return int(float(found.group(1)) * scale)


def _fake_batch(config: Config, preset, batch: int) -> dict:
    size = config.image_size
    images = {m: torch.empty(batch, preset.images_per_modality, 3, size, size)
              for m in preset.modalities}
    shape = (batch, preset.num_classes) if preset.multi_label else (batch,)
    label = (torch.zeros(shape) if preset.multi_label else torch.zeros(shape, dtype=torch.long))
    return {**images, "label": label}


def _fake_parameters(model: torch.nn.Module) -> None:
    """Meta-device parameters and buffers replaced by fake CPU tensors of the same shape (call
    inside FakeTensorMode): CPU autocast then applies to them, and still nothing is stored."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                module._parameters[name] = torch.nn.Parameter(fake, param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype,
                                                    device="cpu")


def step_memory(config: Config, stage: str, precision: str, batch: int,
                swap_layers: Callable[[torch.nn.Module], None] | None = None) -> StepMemory:
    """`swap_layers(model)`, if given, replaces layers of the (meta-device) model in place
    before the count: how benchmarks/plan_eager.py counts the authors' eager MoR layers."""
    preset = resolve_preset(config)
    # Built on the meta device (timm reads values while it builds, which fakes cannot give).
    with torch.device("meta"):
        model = build_model(config, preset, stage, with_weights=False)
        if swap_layers is not None:
            swap_layers(model)
    with FakeTensorMode():
        _fake_parameters(model)
        return _count_step(model, config, preset, stage, precision, batch)


@contextlib.contextmanager
def saved_tensor_bytes(parameters):
    """Inside: every storage autograd saves for backward, but `parameters`, as {id: bytes}
    (identified by the storage itself, which works for fake tensors too: they have no
    addresses)."""
    params = {p.untyped_storage()._cdata for p in parameters}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _count_step(model, config: Config, preset, stage: str, precision: str,
                batch: int) -> StepMemory:
    """One forward of `model` (fake tensors) with every tensor saved for backward counted."""
    task = build_task(config, preset, stage, best_modality=preset.modalities[0])
    params = list(model.parameters())
    with saved_tensor_bytes(params) as saved, autocast(torch.device("cpu"), precision):
        task.loss(model, _fake_batch(config, preset, batch))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return StepMemory(stage, precision, config.model.grad_checkpointing, batch,
                      weights=sum(p.numel() * p.element_size() for p in params),
                      optimizer=2 * 4 * trainable, activations=sum(saved.values()),
                      workspace=2 * max(saved.values(), default=0),
                      blocks=sum(len(m.blocks) for m in model.modules()
                                 if isinstance(getattr(m, "blocks", None), torch.nn.Sequential)))


def plan(config: Config, batch: int | None = None, precisions=PRECISIONS,
         swap_layers: Callable[[torch.nn.Module], None] | None = None) -> list[StepMemory]:
    """Every (stage kind, precision, checkpointing) of the run: the first single-modality stage
    (the others are the same size) and EI (late fusion has fewer parts)."""
    stages = [stage_names(config, resolve_preset(config))[0], "ei"]
    rows = []
    for checkpointing in (False, True):
        model = dataclasses.replace(config.model, grad_checkpointing=checkpointing)
        variant = dataclasses.replace(config, model=model)
        for stage in stages:
            optim = config.single if stage.startswith(SINGLE_PREFIX) else config.ei
            for precision in precisions:
                row = step_memory(variant, stage, precision, batch or optim.batch_size,
                                  swap_layers)
                if checkpointing:
                    # The backward recomputes one block at a time: one block's share of the
                    # activations without checkpointing is live on top of what is saved.
                    full = next(r for r in rows if (r.stage, r.precision) == (stage, precision))
                    row.workspace += full.activations // max(full.blocks, 1)
                rows.append(row)
    return rows


def format_plan(rows: list[StepMemory], limit: int | None) -> str:
    head = ("| stage | precision | checkpointing | batch | weights MiB | grads + optimizer MiB | "
            "activations MiB | workspace MiB | peak MiB |"
            + (f" largest batch in {limit / 2 ** 30:g} GiB |" if limit else ""))
    lines = [head, "|---" * (9 + bool(limit)) + "|"]
    for r in rows:
        cells = [r.stage, r.precision, "yes" if r.checkpointing else "no", str(r.batch),
                 *(f"{v / MiB:.0f}" for v in (r.weights, r.optimizer, r.activations,
                                              r.workspace, r.peak))]
        if limit:
            cells.append(str(r.largest_batch(limit)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
