"""Training augmentation and evaluation preprocessing of docs/EI_SPEC.md ("Training").

Both take a float image batch (..., 3, H, W) in [0, 1] and return (..., 3, size, size),
normalised with the CLIP mean/std. The I images of one modality of one sample (MRI
slices of one volume) get the same random parameters: they share one geometry.

Randomness comes only from the ``torch.Generator`` passed in, so a sample's augmentation
depends on that generator's seed alone, not on worker count, order or the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    # Bilinear with antialias never overshoots [0, 1], unlike bicubic.
    return F.resize(images, [size, size], InterpolationMode.BILINEAR, antialias=True)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (..., 3, H, W) -> CLIP-normalised."""
    return F.normalize(images, list(CLIP_MEAN), list(CLIP_STD))


@dataclass(frozen=True)
class EvalTransform:
    """Resize to size x size and normalise; deterministic."""

    size: int

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return normalise(_resize(images, self.size))


@dataclass(frozen=True)
class TrainTransform:
    """Crop (p=crop_p, 0..crop_max of each side), resize, rotate, flip, colour, normalise.

    Cropping comes before resizing so it is relative to the original image; rotating
    after resizing keeps the cost independent of the original resolution. Rotation fills
    the corners with black. Colour factors apply in the fixed order brightness, contrast,
    saturation.
    """

    size: int
    rotation: float = 180.0
    crop_max: float = 0.1
    crop_p: float = 0.5
    flip_p: float = 0.5
    colour: tuple[float, float] = (0.7, 1.3)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Draw every parameter up front in a fixed order, whatever branches are taken,
        # so that the stream of random numbers (and thus reproducibility) never depends
        # on the image size.
        g = generator
        do_crop = torch.rand((), generator=g).item() < self.crop_p
        sides = [_uniform(g, 0.0, self.crop_max) for _ in range(4)]  # top, bottom, left, right
        angle = _uniform(g, -self.rotation, self.rotation)
        do_flip = torch.rand((), generator=g).item() < self.flip_p
        brightness, contrast, saturation = (_uniform(g, *self.colour) for _ in range(3))

        if do_crop:
            h, w = images.shape[-2:]
            top, left = int(sides[0] * h), int(sides[2] * w)
            height = max(1, h - top - int(sides[1] * h))
            width = max(1, w - left - int(sides[3] * w))
            images = F.crop(images, top, left, height, width)
        images = _resize(images, self.size)
        images = F.rotate(images, angle, InterpolationMode.BILINEAR, fill=[0.0])
        if do_flip:
            images = F.horizontal_flip(images)
        images = F.adjust_brightness(images, brightness)
        images = F.adjust_contrast(images, contrast)
        images = F.adjust_saturation(images, saturation)
        return normalise(images)


def build_transform(size: int, train: bool, augment: bool = True) -> EvalTransform | TrainTransform:
    """The transform for a split: augmentation only when training and augment is on."""
    return TrainTransform(size) if train and augment else EvalTransform(size)
