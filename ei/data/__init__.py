"""Data loading for EI: annotation files, presets, transforms, datasets, synthetic data."""

from .annotations import (
    AnnotationError,
    DataError,
    ImageError,
    Sample,
    load_label_map,
    read_annotations,
)
from .dataset import MultimodalDataset, balanced_indices, collate, slice_indices
from .presets import PRESETS, Preset, get_preset
from .synthetic import ensure_synthetic_dataset
from .transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, build_transform

__all__ = [
    "AnnotationError", "DataError", "ImageError", "Sample", "load_label_map", "read_annotations",
    "MultimodalDataset", "balanced_indices", "collate", "slice_indices",
    "PRESETS", "Preset", "get_preset", "ensure_synthetic_dataset",
    "CLIP_MEAN", "CLIP_STD", "EvalTransform", "TrainTransform", "build_transform",
]
