"""The multimodal dataset: annotation file + label map + data root + preset -> tensors.

Every random choice for a sample (which OCT B-scan, slice jitter, augmentation) comes
from a generator seeded by (seed, epoch, index, modality), so an epoch is reproducible
whatever the number of DataLoader workers, the order of samples, or a resume in the
middle of a run. Call ``set_epoch`` before each epoch; with ``persistent_workers=True``
workers keep their own copy of the dataset and would not see it, so leave that off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import (
    AnnotationError,
    Sample,
    check_label_map,
    class_names,
    load_label_map,
    read_annotations,
)
from .io import check_file, load_image, open_volume, volume_slices
from .presets import Preset, get_preset
from .transforms import build_transform

# Separate random streams per modality: one to choose images/slices, one to augment them.
_SELECT, _AUGMENT = 0, 1


def slice_indices(depth: int, count: int, generator: torch.Generator | None = None,
                  rule: str = "segments") -> list[int]:
    """Indices of `count` slices spread over a volume of `depth` slices.

    "segments" (ours): split the volume into `count` equal segments and take one slice from
    each, its centre in evaluation, a uniformly random one in training (a generator given).
    "rounded" (the authors'): with step = (depth - 1) / count, slice k is
    round(step / 2 + k * step), jittered in training by a uniform offset in [-step/2, step/2)
    before rounding; halves round to even, as numpy's round. Both work for depth < count
    (slices then repeat).
    """
    u = [0.5] * count if generator is None else torch.rand(count, generator=generator).tolist()
    if rule == "segments":
        return [min(depth - 1, int((k + u_k) * depth / count)) for k, u_k in enumerate(u)]
    if rule == "rounded":
        step = (depth - 1) / count
        return [round(step / 2 + k * step + (u_k - 0.5) * step) for k, u_k in enumerate(u)]
    raise ValueError(f"rule: expected 'segments' or 'rounded', got {rule!r}")


class MultimodalDataset(Dataset):
    """Items are dicts: {modality: float (I, 3, size, size)}, ``label``, ``index``.

    ``label`` is a long scalar for single-label presets and a float multi-hot vector
    (num_classes,) for multi-label ones. ``label_map`` is a JSON path, a dict, or None
    for the preset's classes in order. ``check_files`` opens the header of every
    referenced file at construction, so a missing or unreadable image stops the run
    before training starts. ``unlabeled``: annotation lines may be paths alone (prediction).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        label_map: str | Path | Mapping[str, int] | None,
        root: str | Path,
        preset: Preset | str,
        train: bool,
        seed: int = 0,
        check_files: bool = True,
        unlabeled: bool = False,
    ) -> None:
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        source = "label map"
        if label_map is None:
            label_map = {name: i for i, name in enumerate(self.preset.classes)}
        elif isinstance(label_map, Mapping):
            label_map = check_label_map(label_map)
        else:
            source = str(label_map)
            label_map = load_label_map(label_map)
        if len(label_map) != self.preset.num_classes:
            raise AnnotationError(
                f"{source}: has {len(label_map)} classes, preset {self.preset.name!r} expects "
                f"{self.preset.num_classes} ({', '.join(self.preset.classes)})"
            )
        self.label_map = label_map
        self.class_names = class_names(label_map)
        self.root = Path(root)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.transform = build_transform(self.preset.image_size, train, self.preset.augment,
                                         self.preset.transforms)
        self.samples = read_annotations(
            annotation_file, label_map, self.preset.modalities, self.preset.multi_label,
            unlabeled,
        )
        for sample in self.samples:
            self._check(sample, check_files)

    def _check(self, sample: Sample, check_files: bool) -> None:
        count = self.preset.images_per_modality
        for name, kind, paths in zip(self.preset.modalities, self.preset.kinds, sample.paths):
            wanted = {"image": count, "volume": 1}.get(kind)  # "pick" takes any number >= 1
            if wanted is not None and len(paths) != wanted:
                raise AnnotationError(
                    f"{sample.where}: modality {name!r} ({kind}) needs {wanted} path(s), "
                    f"found {len(paths)}"
                )
            if check_files:
                for p in paths:
                    check_file(self.root / p, kind, sample.where)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> np.ndarray:
        """Labels of all samples: (N,) int64, or (N, K) float32 multi-hot if multi-label."""
        if not self.preset.multi_label:
            return np.array([s.labels[0] for s in self.samples], dtype=np.int64)
        hot = np.zeros((len(self.samples), self.preset.num_classes), dtype=np.float32)
        for i, s in enumerate(self.samples):
            hot[i, list(s.labels)] = 1.0
        return hot

    def _generator(self, index: int, modality: int, stream: int, *part: int) -> torch.Generator:
        seq = np.random.SeedSequence([self.seed, self.epoch, index, modality, stream, *part])
        return torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0]))

    def _augment_generator(self, index: int, m: int, slice_k: int | None):
        """Augmentation randomness of modality m (of its slice `slice_k`, if given); None in
        evaluation."""
        if not self.train:
            return None
        extra = () if slice_k is None else (slice_k,)
        return self._generator(index, m, _AUGMENT, *extra)

    def _images(self, sample: Sample, m: int, index: int) -> list[torch.Tensor]:
        """Raw images of modality m as tensors (n, 3, H, W) in [0, 1]; n sums to I."""
        kind, paths = self.preset.kinds[m], sample.paths[m]
        select = self._generator(index, m, _SELECT) if self.train else None
        if kind == "volume":
            volume = open_volume(self.root / paths[0], sample.where)
            chosen = slice_indices(volume.shape[0], self.preset.images_per_modality, select,
                                   self.preset.slice_sampling)
            slices = volume_slices(volume, chosen).unsqueeze(1).expand(-1, 3, -1, -1)
            # One group per slice when each slice gets its own augmentation.
            return list(slices.split(1)) if self.preset.per_slice_augmentation else [slices]
        if kind == "pick":
            if select is None and self.preset.pick_sorted:
                paths = sorted(paths)
            pick = 0 if select is None else int(torch.randint(len(paths), (), generator=select))
            paths = paths[pick : pick + 1]
        return [load_image(self.root / p, sample.where).unsqueeze(0) for p in paths]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        sample = self.samples[index]
        item: dict[str, torch.Tensor | int] = {}
        for m, name in enumerate(self.preset.modalities):
            # Images of one modality may differ in size, so each group is transformed on its
            # own: with identically seeded generators (all get the same parameters), or with
            # one generator per slice under per-slice augmentation.
            per_slice = self.preset.per_slice_augmentation and self.preset.kinds[m] == "volume"
            item[name] = torch.cat([
                self.transform(images, self._augment_generator(index, m, k if per_slice else None))
                for k, images in enumerate(self._images(sample, m, index))
            ])
        if self.preset.multi_label:
            label = torch.zeros(self.preset.num_classes)
            label[list(sample.labels)] = 1.0
            item["label"] = label
        else:
            item["label"] = torch.tensor(sample.labels[0], dtype=torch.long)
        item["index"] = index
        return item


def collate(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack items: modalities (B, I, 3, H, W), label (B,) or (B, K), index (B,)."""
    out = {}
    for key, value in batch[0].items():
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(value, torch.Tensor) else torch.tensor(values)
    return out


def balanced_indices(targets: np.ndarray) -> list[int]:
    """Indices that repeat samples of rare groups until every group is as large as the largest.

    The spec's balanced splits repeat annotation lines of rare classes; this does the same
    deterministically (use with ``torch.utils.data.Subset``). A sample's group is its class
    for single-label targets (N,); for multi-hot targets (N, K) it is its rarest positive
    label, and samples with no positive label form one more group.
    """
    targets = np.asarray(targets)
    if targets.ndim == 1:
        groups = targets.tolist()
    else:
        positives = targets.sum(axis=0)
        # Rank labels by frequency; a sample joins the group of its least frequent label.
        groups = [
            int(min(np.flatnonzero(row), key=lambda k: (positives[k], k))) if row.any() else -1
            for row in targets
        ]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    largest = max(len(idx) for idx in members.values())
    out = []
    for idx in members.values():
        times, extra = divmod(largest, len(idx))
        out += idx * times + idx[:extra]
    return sorted(out)
