"""Short backbone names (no torch needed: the config reads them)."""

from __future__ import annotations

DINOV2 = "vit_base_patch14_reg4_dinov2"
# The name the reference uses. OpenAI trained with QuickGELU, which this timm variant replaces
# by GELU; "vit_base_patch16_clip_quickgelu_224.openai" is the activation-exact one.
CLIP = "vit_base_patch16_clip_224.openai"
# Short names -> (timm model name, architecture overrides).
ALIASES: dict[str, tuple[str, dict]] = {
    "dinov2": (DINOV2, {}),
    "clip": (CLIP, {}),
    # The DINOv2 layout (4 registers, no position embedding on CLS/registers) at toy size, for
    # tests and the CPU demo. Layer scale 1 (timm drops a None override): with DINOv2's 1e-5 a
    # random block would be an identity.
    "tiny": (DINOV2, dict(embed_dim=64, depth=4, num_heads=4, patch_size=8, init_values=1.0)),
}
