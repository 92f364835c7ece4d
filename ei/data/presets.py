"""Dataset presets: what a sample looks like for each dataset of docs/EI_SPEC.md.

Each modality has a *kind* that says how its annotation field becomes I images:

- ``"image"``: the field lists exactly I JPEG/PNG paths, stacked in order.
- ``"pick"``: the field lists one or more images (MMC-AMD OCT: 1-6 B-scans); training
  picks one at random, evaluation takes the first (of the sorted paths with
  ``pick_sorted``, as the authors' code does). Needs I = 1.
- ``"volume"``: the field is one .npy volume (S x H x W); I slices are sampled uniformly
  (jittered in training) and the grey values repeated to 3 channels.

Make your own with ``Preset(...)`` or ``dataclasses.replace(get_preset("derm7pt"), ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("image", "pick", "volume")
SLICE_SAMPLING = ("segments", "rounded")
# Keys that a dataset item uses besides the modality names.
RESERVED = ("label", "index")


@dataclass(frozen=True)
class Preset:
    name: str
    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    image_size: int
    multi_label: bool = False
    images_per_modality: int = 1
    kinds: tuple[str, ...] | None = None  # per modality; None means all "image"
    augment: bool = True  # training augmentation of docs/EI_SPEC.md; eval never augments
    # "pick" modalities in evaluation: the first image as listed, or (the authors' code) the
    # first after sorting the paths.
    pick_sorted: bool = False
    # The protocol's image choices (ei.train.config PROTOCOL_CHOICES): the image pipeline
    # ("ours" or "authors", ei.data.transforms), one set of augmentation parameters per volume
    # or one per slice, and which slices ("segments" or "rounded", ei.data.dataset).
    transforms: str = "ours"
    per_slice_augmentation: bool = False
    slice_sampling: str = "segments"

    def __post_init__(self) -> None:
        if self.kinds is None:
            object.__setattr__(self, "kinds", ("image",) * len(self.modalities))
        if len(self.kinds) != len(self.modalities):
            raise ValueError(f"preset {self.name}: {len(self.kinds)} kinds for "
                             f"{len(self.modalities)} modalities")
        if self.slice_sampling not in SLICE_SAMPLING:
            raise ValueError(f"preset {self.name}: slice_sampling {self.slice_sampling!r} is not "
                             f"one of {SLICE_SAMPLING}")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"preset {self.name}: unknown kind {kind!r}; use one of {KINDS}")
            if kind == "pick" and self.images_per_modality != 1:
                raise ValueError(f"preset {self.name}: kind 'pick' needs images_per_modality=1")
        names = set(self.modalities)
        if len(names) != len(self.modalities) or names & set(RESERVED):
            raise ValueError(f"preset {self.name}: modality names must be unique, not {RESERVED}")
        if self.images_per_modality < 1 or self.image_size < 1:
            raise ValueError(f"preset {self.name}: image_size and images_per_modality must be >= 1")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


PRESETS = {
    p.name: p
    for p in (
        Preset("mmc-amd", ("cfp", "oct"), ("no_amd", "dry_amd", "pcv", "wet_amd"), 448,
               kinds=("image", "pick")),
        Preset("derm7pt", ("clinical", "dermoscopic"), ("BCC", "NEV", "MEL", "SK", "MISC"), 512),
        Preset("mrnet", ("axial", "coronal", "sagittal"), ("abnormal", "meniscus", "acl"), 256,
               multi_label=True, images_per_modality=4, kinds=("volume",) * 3),
        # ei.data.synthetic documents this one. No augmentation: the label links a place
        # in one modality to the same place in the other, and independent random rotations
        # per modality would break that link.
        Preset("synthetic", ("locator", "appearance"),
               ("horizontal", "vertical", "checker", "solid"), 32, augment=False),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
