"""The datasets and loaders of a run, from the data section of its config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ei.data import MultimodalDataset, Preset, balanced_indices, collate, ensure_synthetic_dataset, get_preset

from .config import Config
from .distributed import World, barrier


class CachedDataset(Dataset):
    """Keeps each decoded item after its first use. Only for splits whose items never change
    (no augmentation, no random image or slice choice): then a cached item is exactly what the
    dataset would return again, and reading PNGs no longer costs every epoch and stage.
    Other attributes (samples, targets, class_names, ...) are the wrapped dataset's."""

    def __init__(self, dataset: MultimodalDataset) -> None:
        self.dataset = dataset
        self.items: list = [None] * len(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # Only called for attributes not found on the wrapper itself.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        if self.items[index] is None:
            self.items[index] = self.dataset[index]
        return self.items[index]


def is_deterministic(dataset: MultimodalDataset) -> bool:
    preset = dataset.preset
    return not dataset.train or (not preset.augment and all(k == "image" for k in preset.kinds))


def resolve_preset(config: Config) -> Preset:
    preset = get_preset(config.data.preset)
    protocol = config.protocol
    return dataclasses.replace(
        preset, image_size=config.image_size, pick_sorted=protocol.eval_pick == "first_sorted",
        transforms=protocol.transforms, slice_sampling=protocol.slice_sampling,
        per_slice_augmentation=protocol.slice_augmentation == "per_slice")


def data_root(config: Config, world: World) -> Path:
    """The data directory; the synthetic set is generated there first if needed (by rank 0,
    while the others wait, so no two processes write it)."""
    data = config.data
    if data.preset != "synthetic":
        root = Path(data.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: no directory at {root}")
        return root
    s = data.synthetic

    def make() -> Path:
        return ensure_synthetic_dataset(data.root, seed=s.seed, n_train=s.n_train,
                                        n_val=s.n_val, n_test=s.n_test, noise=s.noise)

    if world.is_main:
        root = make()
    barrier(world)
    if not world.is_main:
        root = make()
    return root


@dataclass
class Splits:
    preset: Preset
    root: Path
    train: Dataset  # MultimodalDataset, or a CachedDataset of one
    val: Dataset
    test: Dataset
    class_names: list[str]

    def get(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split: expected train, val or test, got {split!r}")
        return getattr(self, split)


def annotation_dir(config: Config, root: Path) -> Path:
    """The folder of the annotation and label-map files: data.splits, else the data root."""
    return Path(config.data.splits) if config.data.splits is not None else root


def open_dataset(config: Config, root: Path, preset: Preset, annotations: str | Path,
                 train: bool) -> MultimodalDataset:
    """`annotations` relative to annotation_dir(); the image paths in it relative to `root`."""
    where = annotation_dir(config, root)
    labels = where / config.data.labels if config.data.labels else None
    dataset = MultimodalDataset(where / annotations, labels, root, preset, train=train,
                                seed=config.seed)
    return CachedDataset(dataset) if config.data.cache and is_deterministic(dataset) else dataset


def build_splits(config: Config, world: World) -> Splits:
    root, preset = data_root(config, world), resolve_preset(config)
    d = config.data
    train = open_dataset(config, root, preset, d.train, train=True)
    val = open_dataset(config, root, preset, d.val, train=False)
    test = open_dataset(config, root, preset, d.test, train=False)
    return Splits(preset, root, train, val, test, train.class_names)


def make_loader(dataset: Dataset, config: Config, batch_size: int, world: World,
                train: bool, seed: int) -> DataLoader:
    """A loader sharded over the world's ranks. The sampler's order depends on (seed, epoch)
    only, so an epoch is the same after a resume; call loader.sampler.set_epoch(epoch)."""
    source = dataset
    if train and config.data.balanced:
        source = Subset(source, balanced_indices(dataset.targets))
    # Evaluation shards are padded to equal size by repeating samples; the gathered results are
    # deduplicated by sample index.
    sampler = DistributedSampler(source, num_replicas=world.size, rank=world.rank, shuffle=train,
                                 seed=seed, drop_last=False)
    return DataLoader(source, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=config.data.workers, pin_memory=world.device.type == "cuda")
