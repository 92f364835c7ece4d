"""Data loading for EI: annotation files, presets, transforms, datasets, synthetic data.
Names are imported from their submodules on first use (ei/lazy.py)."""

from ei.lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(__name__, {
    "annotations": ("AnnotationError", "DataError", "ImageError", "Sample", "load_label_map",
                    "read_annotations"),
    "dataset": ("MultimodalDataset", "balanced_indices", "collate", "slice_indices"),
    "presets": ("PRESETS", "Preset", "get_preset"),
    "synthetic": ("SyntheticRootError", "check_synthetic_root", "ensure_synthetic_dataset"),
    "transforms": ("CLIP_MEAN", "CLIP_STD", "EvalTransform", "TrainTransform",
                   "build_transform"),
})
