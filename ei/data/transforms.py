"""Training augmentation and evaluation preprocessing of docs/EI_SPEC.md ("Training"), ours and
the authors' (config protocol.transforms; docs/REPRODUCING.md lists how they differ).

All take a float image batch (..., 3, H, W) in [0, 1] and return (..., 3, size, size),
normalised with the CLIP mean/std. The I images of one modality of one sample (MRI
slices of one volume) get the same random parameters: they share one geometry.

Randomness comes only from the ``torch.Generator`` passed in, so a sample's augmentation
depends on that generator's seed alone, not on worker count, order or the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

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
    """Resize to size x size and normalise; deterministic. Bilinear with antialiasing, or
    without (`antialias=False`, the authors' OpenCV resize)."""

    size: int
    antialias: bool = True

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        resize = _resize if self.antialias else _plain_resize
        return normalise(resize(images, self.size))


@dataclass(frozen=True)
class AugmentationRanges:
    """The training augmentation's ranges (docs/EI_SPEC.md), shared by both pipelines: rotation
    up to `rotation` degrees either way, a crop of up to crop_max of each side (p=crop_p), a
    flip (p=flip_p), colour factors in `colour`."""

    size: int
    rotation: int = 180
    crop_max: float = 0.1
    crop_p: float = 0.5
    flip_p: float = 0.5
    colour: tuple[float, float] = (0.7, 1.3)


@dataclass(frozen=True)
class TrainTransform(AugmentationRanges):
    """Crop (p=crop_p, 0..crop_max of each side), resize, rotate, flip, colour, normalise.

    Cropping comes before resizing so it is relative to the original image; rotating
    after resizing keeps the cost independent of the original resolution. Rotation fills
    the corners with black. Colour factors apply in the fixed order brightness, contrast,
    saturation.
    """

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


def _luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (..., 1, H, W) of RGB images (..., 3, H, W), the authors' grey."""
    r, g, b = images.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _plain_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    # Bilinear without antialiasing, as OpenCV's default resize the authors use.
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.resize(images, [size, size], InterpolationMode.BILINEAR, antialias=False)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high), as numpy's randint."""
    return int(torch.randint(low, high, (), generator=generator))


@dataclass(frozen=True)
class AuthorsAugmentation:
    """One draw of the authors' augmentation parameters (sides in pixels)."""

    degrees: int
    crop: tuple[int, int, int, int] | None  # (top, bottom, left, right), or no crop
    flip: bool
    contrast: float
    brightness: float
    saturation: float


@dataclass(frozen=True)
class AuthorsTrainTransform(AugmentationRanges):
    """The authors' augmentation, in their order and with their value types: rotation by a
    whole number of degrees in [-180, 180) about the pixel (W // 2, H // 2) with black corners,
    then (p=crop_p) a crop of 0..int(crop_max * side) whole pixels off each side, a flip, a
    plain bilinear resize, contrast, brightness and saturation factors (contrast blends with the
    image's mean luma, saturation with each pixel's), and a single clip to [0, 1] at the end.
    """

    def draw(self, height: int, width: int, generator: torch.Generator) -> AuthorsAugmentation:
        # In the authors' order; a crop's four sides only when it crops, as theirs.
        g = generator
        degrees = _randint(g, -self.rotation, self.rotation) if self.rotation else 0
        crop = None
        if torch.rand((), generator=g).item() < self.crop_p:
            w_dev, h_dev = int(self.crop_max * width), int(self.crop_max * height)
            left, right = _randint(g, 0, w_dev + 1), _randint(g, 0, w_dev + 1)
            top, bottom = _randint(g, 0, h_dev + 1), _randint(g, 0, h_dev + 1)
            crop = (top, bottom, left, right)
        flip = torch.rand((), generator=g).item() < self.flip_p
        contrast, brightness, saturation = (_uniform(g, *self.colour) for _ in range(3))
        return AuthorsAugmentation(degrees, crop, flip, contrast, brightness, saturation)

    def apply(self, images: torch.Tensor, a: AuthorsAugmentation) -> torch.Tensor:
        """Images in [0, 1] (..., 3, H, W) -> augmented (..., 3, size, size), not normalised."""
        h, w = images.shape[-2:]
        # OpenCV turns clockwise for their angle, torchvision counter-clockwise for its own;
        # OpenCV's pixel (W // 2, H // 2) is the point (W // 2 + 1/2, H // 2 + 1/2) of
        # torchvision, whose coordinates start at the corner of pixel 0.
        images = F.rotate(images, -a.degrees, InterpolationMode.BILINEAR,
                          center=[w // 2 + 0.5, h // 2 + 0.5], fill=[0.0])
        if a.crop is not None:
            top, bottom, left, right = a.crop
            images = images[..., top:h - bottom, left:w - right]
        if a.flip:
            images = F.horizontal_flip(images)
        images = _plain_resize(images, self.size)
        mean_luma = _luma(images).mean(dim=(-3, -2, -1), keepdim=True)
        images = a.contrast * images + (1.0 - a.contrast) * mean_luma
        images = a.brightness * images
        images = a.saturation * images + (1.0 - a.saturation) * _luma(images)
        return images.clamp(0.0, 1.0)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return normalise(self.apply(images, self.draw(*images.shape[-2:], generator)))


TRANSFORMS = {"ours": (TrainTransform, EvalTransform),
              "authors": (AuthorsTrainTransform, partial(EvalTransform, antialias=False))}


def build_transform(size: int, train: bool, augment: bool = True, style: str = "ours"):
    """The transform for a split in `style` ("ours" or "authors"): augmentation only when
    training and augment is on."""
    if style not in TRANSFORMS:
        raise ValueError(f"style: expected one of {list(TRANSFORMS)}, got {style!r}")
    train_transform, eval_transform = TRANSFORMS[style]
    return train_transform(size) if train and augment else eval_transform(size)
