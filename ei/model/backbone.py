"""timm ViT backbones: creation by name, weights, and a forward that can take extra tokens.

Image sizes that are not a multiple of the patch size (DINOv2's 14 px patches at 256 or 512 px)
are zero-padded at the right and bottom to the next multiple: every pixel is seen, nothing is
resampled, and the position embedding is sized once for the padded grid when the model is built
(timm's checkpoint filter resamples pretrained ones to it). Inputs are normalised images, so the
padding is the dataset mean colour. timm's own default would silently drop the last pixels.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .aliases import ALIASES, DINOV2
from .checkpoint import load_strict, read_state_dict
from .mor import apply_mor
from .mor_config import MoRConfig


def padded_size(img_size, patch_size) -> tuple[int, int]:
    """(H, W) rounded up to multiples of the patch size."""
    return tuple(math.ceil(s / p) * p for s, p in zip(to_2tuple(img_size), to_2tuple(patch_size)))


def create_vit(name: str, img_size=224, *, pretrained: bool = False,
               checkpoint: str | Path | None = None, antialias: bool = True,
               **timm_kwargs) -> VisionTransformer:
    """A timm VisionTransformer without classifier (num_classes=0) for `img_size` images.

    `name`: an alias of ALIASES or any timm ViT name (with or without a pretrained tag).
    Random init by default; `pretrained=True` downloads timm's weights; `checkpoint` loads a
    local file (see `load_vit_weights`). Pretrained position embeddings are resized to this
    model's grid by bicubic interpolation, antialiased unless `antialias=False`. `timm_kwargs`
    override the architecture.
    """
    if pretrained and checkpoint is not None:
        raise ValueError("pretrained/checkpoint: give one source of weights, not both")
    model_name, preset = ALIASES.get(name, (name, {}))
    if not timm.is_model(model_name):
        raise ValueError(f"name: {name!r} is neither an alias {sorted(ALIASES)} nor a timm model")
    kwargs = {**preset, **timm_kwargs, "num_classes": 0}
    size = tuple(to_2tuple(img_size))
    vit = timm.create_model(model_name, pretrained=False, img_size=size, **kwargs)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"name: {name!r} is a {type(vit).__name__}, not a timm VisionTransformer")
    # The patch size, known once built, decides the padded size; the downloaded weights are
    # resampled by timm to the grid of the model they are loaded into, so build that one.
    padded = padded_size(size, vit.patch_embed.patch_size)
    try:
        if pretrained and not antialias:
            # timm's own loading resamples with antialiasing: load the weights at their own
            # grid, then resample them here.
            native = timm.create_model(model_name, pretrained=True, **kwargs)
            vit = timm.create_model(model_name, pretrained=False, img_size=padded, **kwargs)
            _load_filtered(vit, native.state_dict(), antialias, f"timm's weights of {model_name}")
        elif padded != size or pretrained:
            vit = timm.create_model(model_name, pretrained=pretrained, img_size=padded, **kwargs)
    except OSError as err:  # the hub's errors offline are OSErrors that never say what to do
        if not pretrained:
            raise
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise OSError(f"timm's pretrained weights of {model_name} could not be fetched "
                      f"({cause}); without network, load a local weight file instead "
                      f"(model.checkpoint=FILE model.pretrained=false)") from err
    if checkpoint is not None:
        load_vit_weights(vit, checkpoint, antialias)
    return vit


def load_vit_weights(vit: VisionTransformer, path: str | Path, antialias: bool = True) -> None:
    """Load a timm-format state dict, or an original DINOv2 / OpenAI CLIP file, into `vit`
    (before MoR is injected). Original layouts go through the checkpoint filter of the model's
    timm module, which also resamples the position embedding to this model's grid (bicubic,
    antialiased unless `antialias=False`). A head in the file is ignored when the model has
    none (CLIP's projection): the classifier is ours."""
    _load_filtered(vit, read_state_dict(path), antialias, f"checkpoint {path}")


def _load_filtered(vit: VisionTransformer, state: dict, antialias: bool, where: str) -> None:
    filter_fn = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, vit, antialias=antialias)
    if isinstance(vit.head, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_strict(vit, state, where)


@torch.no_grad()
def attention_weights(block: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention (N, heads, T, T) that `block` computes on its input x (N, T, D).

    timm's Attention fuses it away (scaled_dot_product_attention), so it is recomputed from the
    block's own norm1, qkv (MoR included) and q/k norms."""
    attn = getattr(block, "attn", None)
    if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale", "q_norm", "k_norm")):
        raise TypeError(f"attention maps need a timm Attention with qkv, got {type(attn).__name__}")
    h = block.norm1(x)
    n, t, _ = h.shape
    q, k, _ = attn.qkv(h).reshape(n, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class ViTBackbone(nn.Module):
    """A timm VisionTransformer run block by block, so that extra tokens can join the sequence
    before any block; returns the CLS token after the final norm.

    The extra tokens get no position embedding: they are appended after the patch tokens or,
    with `prepend=True`, put right after the prefix tokens (CLS and registers)."""

    def __init__(self, vit: VisionTransformer, input_size=None) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"vit: expected a timm VisionTransformer, got {type(vit).__name__}")
        if vit.cls_token is None:
            raise ValueError("vit: EI reads the CLS token, and this model has none")
        self.vit = vit
        embed = vit.patch_embed
        self.input_size = tuple(to_2tuple(input_size if input_size is not None else embed.img_size))
        size = padded_size(self.input_size, embed.patch_size)
        if not vit.dynamic_img_size and size != tuple(embed.img_size):
            raise ValueError(
                f"input_size: {self.input_size} pads to {size}, but the model is built for "
                f"{tuple(embed.img_size)} (create it with create_vit(..., img_size={input_size}))"
            )
        # F.pad order: (left, right, top, bottom).
        self.padding = (0, size[1] - self.input_size[1], 0, size[0] - self.input_size[0])

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def embed(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) images -> (N, prefix + patches, D) tokens, as timm's forward_features
        starts: patch embedding, position embedding with CLS/registers, patch dropout, norm_pre."""
        channels = self.vit.patch_embed.proj.in_channels
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != channels or shape[2:] != self.input_size:
            raise ValueError(
                f"images: expected shape (N, {channels}, {self.input_size[0]}, "
                f"{self.input_size[1]}), got {shape}"
            )
        if any(self.padding):
            images = F.pad(images, self.padding)
        x = self.vit._pos_embed(self.vit.patch_embed(images))
        return self.vit.norm_pre(self.vit.patch_drop(x))

    def forward(self, images: Tensor, tokens: Tensor | None = None, *, inject_at: int = 0,
                prepend: bool = False, return_attention: bool = False):
        """CLS features (N, D) of `images` (N, 3, H, W), with `tokens` (N, T, D) joining the
        sequence before block `inject_at` (0..depth). With `return_attention`, also the last
        block's attention (N, heads, S, S), detached; the sequence order is prefix tokens,
        patches, then the extra tokens (after the prefix with `prepend`)."""
        x = self.embed(images)
        blocks = self.vit.blocks
        if tokens is not None:
            self._check_tokens(tokens, x, inject_at)
        attention = None
        for i, block in enumerate(blocks):
            if tokens is not None and i == inject_at:
                x = self._insert(x, tokens, prepend)
            if return_attention and i == len(blocks) - 1:
                attention = attention_weights(block, x)
            if self.vit.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        # Tokens joining after the last block (inject_at == depth) would only pass through the
        # per-token final norm: they cannot reach the CLS, so they are not added at all.
        cls = self.vit.fc_norm(self.vit.norm(x[:, 0]))  # norms are per token: CLS only
        return (cls, attention) if return_attention else cls

    def _check_tokens(self, tokens: Tensor, x: Tensor, inject_at: int) -> None:
        if not 0 <= inject_at <= self.depth:
            raise ValueError(f"inject_at: expected a block index in 0..{self.depth}, "
                             f"got {inject_at}")
        if tokens.dim() != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != x.shape[2]:
            raise ValueError(
                f"tokens: expected shape ({x.shape[0]}, T, {x.shape[2]}), got {tuple(tokens.shape)}"
            )

    def _insert(self, x: Tensor, tokens: Tensor, prepend: bool) -> Tensor:
        tokens = tokens.to(x.dtype)
        if not prepend:
            return torch.cat([x, tokens], dim=1)
        p = self.vit.num_prefix_tokens
        return torch.cat([x[:, :p], tokens, x[:, p:]], dim=1)


@dataclass
class BackboneConfig:
    """How to build one backbone: timm model (or alias), input size, weights, adaptation."""

    name: str = DINOV2
    img_size: int | tuple[int, int] = 448
    pretrained: bool = False
    checkpoint: str | None = None
    timm_kwargs: dict = field(default_factory=dict)
    mor: MoRConfig = field(default_factory=MoRConfig)
    # Recompute each block in backward instead of keeping its activations (less memory).
    grad_checkpointing: bool = False
    # Pretrained position embeddings resized to this grid: antialiased bicubic, or plain.
    pos_embed_antialias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mor, dict):
            self.mor = MoRConfig(**self.mor)


def build_backbone(config: BackboneConfig) -> ViTBackbone:
    """Create the ViT, load its weights, inject MoR (freezing the rest) and wrap it."""
    vit = create_vit(config.name, config.img_size, pretrained=config.pretrained,
                     checkpoint=config.checkpoint, antialias=config.pos_embed_antialias,
                     **config.timm_kwargs)
    apply_mor(vit, config.mor)
    vit.set_grad_checkpointing(config.grad_checkpointing)
    return ViTBackbone(vit, config.img_size)
