"""The single-modality model: backbone + linear classifier on the CLS feature, max over images."""

from __future__ import annotations

from torch import Tensor, nn

from .backbone import BackboneConfig, ViTBackbone, build_backbone


def flatten_images(images: Tensor, what: str = "images") -> tuple[Tensor, int, int]:
    """(B, I, C, H, W) -> ((B*I, C, H, W), B, I); the backbone checks C, H, W."""
    if images.dim() != 5:
        raise ValueError(f"{what}: expected shape (B, I, 3, H, W), got {tuple(images.shape)}")
    b, i = images.shape[:2]
    return images.flatten(0, 1), b, i


class SingleModalityModel(nn.Module):
    """Stage one of the reference procedure, and EI's auxiliary model of a modality."""

    def __init__(self, backbone: ViTBackbone, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.embed_dim, num_classes)

    @classmethod
    def build(cls, config: BackboneConfig, num_classes: int) -> "SingleModalityModel":
        return cls(build_backbone(config), num_classes)

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, I, 3, H, W) -> (CLS features max-pooled over the I images (B, D),
        logits max-pooled over the I images (B, classes))."""
        flat, b, i = flatten_images(images)
        cls = self.backbone(flat).view(b, i, -1)
        return cls.amax(dim=1), self.classifier(cls).amax(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]
