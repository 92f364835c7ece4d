"""The EI model (docs/EI_SPEC.md, Model): auxiliary backbones -> [INT] tokens -> main backbones ->
per-modality logits, fused by a modality gate."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .backbone import BackboneConfig, build_backbone
from .checkpoint import load_strict, read_state_dict
from .single import SingleModalityModel, flatten_images

INT_POSITIONS = ("append", "prepend")


@dataclass
class EIConfig:
    """`inject_layer`: the block the [INT] tokens join before (0 = early intervention, up to
    depth); None or "none" = the late-fusion baseline (no tokens, no adapters).
    `int_position`: where the tokens sit, after the patch tokens ("append") or right after
    CLS/registers ("prepend"); without position embeddings both give the same CLS."""

    modalities: tuple[str, ...]
    num_classes: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    inject_layer: Optional[int] = 0
    int_position: str = "append"
    adapter_hidden: int = 384

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if len(self.modalities) < 2 or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities: expected at least 2 distinct names, "
                             f"got {self.modalities}")
        for m in self.modalities:
            if not isinstance(m, str) or not m or "." in m:
                raise ValueError(f"modalities: names must be non-empty strings without '.', "
                                 f"got {m!r}")
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if isinstance(self.inject_layer, str) and self.inject_layer.lower() == "none":
            self.inject_layer = None
        if self.inject_layer is not None and (
            isinstance(self.inject_layer, bool) or not isinstance(self.inject_layer, int)
            or self.inject_layer < 0
        ):
            raise ValueError(f"inject_layer: expected a block index >= 0 or None, "
                             f"got {self.inject_layer!r}")
        if self.int_position not in INT_POSITIONS:
            raise ValueError(f"int_position: expected one of {INT_POSITIONS}, "
                             f"got {self.int_position!r}")

    @property
    def late_fusion(self) -> bool:
        return self.inject_layer is None


class IntAdapter(nn.Sequential):
    """Maps a reference modality's stage-1 feature to one [INT] token of the target modality."""

    def __init__(self, dim: int, hidden: int = 384) -> None:
        super().__init__(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, hidden), nn.GELU(),
                         nn.Linear(hidden, dim))


@dataclass
class EIOutput:
    """Per-modality dicts are in the config's modality order, as are alpha's columns.
    `attention`: modality -> last main block's attention (B, I, heads, S, S), when asked."""

    fused: Tensor
    stage1: dict[str, Tensor]
    stage2: dict[str, Tensor]
    alpha: Tensor
    attention: Optional[dict[str, Tensor]] = None


def adapter_name(target: str, source: str) -> str:
    return f"{target}_from_{source}"


class EIModel(nn.Module):
    """aux[m]: stage-1 model of modality m (backbone + its classifier); main[m]: stage-2
    backbone; heads[m]: stage-2 classifier; adapters[target_from_source]; gate."""

    def __init__(self, config: EIConfig) -> None:
        super().__init__()
        self.config = config
        mods, classes = config.modalities, config.num_classes
        self.aux = nn.ModuleDict(
            {m: SingleModalityModel.build(config.backbone, classes) for m in mods})
        self.main = nn.ModuleDict({m: build_backbone(config.backbone) for m in mods})
        first = self.main[mods[0]]
        dim, depth = first.embed_dim, first.depth
        if config.inject_layer is not None and config.inject_layer > depth:
            raise ValueError(f"inject_layer: the backbone has {depth} blocks, so 0..{depth}; "
                             f"got {config.inject_layer}")
        self.heads = nn.ModuleDict({m: nn.Linear(dim, classes) for m in mods})
        self.adapters = None if config.late_fusion else nn.ModuleDict({
            adapter_name(t, s): IntAdapter(dim, config.adapter_hidden)
            for t in mods for s in mods if s != t
        })
        self.gate = nn.Linear(dim * len(mods), len(mods))

    @classmethod
    def from_single(cls, config: EIConfig,
                    singles: Mapping[str, "SingleModalityModel | Mapping[str, Tensor] | str | Path"]
                    ) -> "EIModel":
        """EI built from trained single-modality models (modules, state dicts or files), as
        the reference procedure: aux[m] is a copy of the single model of m with its classifier,
        main[m] a copy of its backbone (MoR included) with a fresh classifier."""
        missing = [m for m in config.modalities if m not in singles]
        if missing:
            raise KeyError(f"singles: no single-modality model for modalities {missing}")
        # The single models hold the backbone weights: do not read pretrained files again.
        backbone = replace(config.backbone, pretrained=False, checkpoint=None)
        model = cls(replace(config, backbone=backbone))
        for m in config.modalities:
            state = singles[m]
            if isinstance(state, (str, Path)):
                state = read_state_dict(state)
            elif isinstance(state, nn.Module):
                state = state.state_dict()
            load_strict(model.aux[m], state, f"single-modality model of {m!r}")
            body = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            load_strict(model.main[m], body, f"single-modality backbone of {m!r}")
        return model

    def check_inputs(self, images: Mapping[str, Tensor]) -> int:
        """Batch size of `images` (modality -> (B, I, 3, H, W)); extra keys (labels) are
        ignored. Raises KeyError for a missing modality, ValueError for a wrong shape."""
        mods = self.config.modalities
        missing = [m for m in mods if m not in images]
        if missing:
            raise KeyError(f"images: missing modalities {missing}; the model takes {list(mods)}")
        batch = None
        for m in mods:
            x, size = images[m], self.main[m].input_size
            if x.dim() != 5 or x.shape[2] != 3 or tuple(x.shape[3:]) != size:
                raise ValueError(f"images[{m!r}]: expected shape (B, I, 3, {size[0]}, {size[1]}), "
                                 f"got {tuple(x.shape)}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"images[{m!r}]: batch size {x.shape[0]}, "
                                 f"other modalities {batch}")
            batch = x.shape[0]
        return batch

    def int_tokens(self, target: str, features: Mapping[str, Tensor]) -> Optional[Tensor]:
        """(B, M-1, D) [INT] tokens of `target` from the stage-1 features of the others."""
        if self.adapters is None:
            return None
        sources = [s for s in self.config.modalities if s != target]
        tokens = [self.adapters[adapter_name(target, s)](features[s]) for s in sources]
        return torch.stack(tokens, dim=1)

    def forward(self, images: Mapping[str, Tensor], return_attention: bool = False) -> EIOutput:
        self.check_inputs(images)
        mods, config = self.config.modalities, self.config
        # Stage 1: not detached, so the [INT] path also trains the auxiliary MoR.
        features, stage1 = {}, {}
        for m in mods:
            features[m], stage1[m] = self.aux[m].features_and_logits(images[m])
        cls2, stage2, attention = {}, {}, {}
        for t in mods:
            flat, b, i = flatten_images(images[t])
            tokens = self.int_tokens(t, features)
            if tokens is not None:
                tokens = tokens.repeat_interleave(i, dim=0)  # the same tokens for each image
            out = self.main[t](flat, tokens, inject_at=config.inject_layer or 0,
                               prepend=config.int_position == "prepend",
                               return_attention=return_attention)
            if return_attention:
                out, maps = out
                attention[t] = maps.view(b, i, *maps.shape[1:])
            cls2[t] = out.view(b, i, -1).mean(dim=1)
            stage2[t] = self.heads[t](cls2[t])
        # The gate sees detached features and weights detached logits: the fused term trains
        # the gate only, never the backbones or the classifiers.
        alpha = self.gate(torch.cat([cls2[m].detach() for m in mods], dim=1)).softmax(dim=-1)
        logits = torch.stack([stage2[m].detach() for m in mods], dim=1)
        fused = (alpha.unsqueeze(-1) * logits).sum(dim=1)
        return EIOutput(fused, stage1, stage2, alpha, attention if return_attention else None)
