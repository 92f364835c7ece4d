"""``ei predict``: class probabilities of every sample of an annotation file, as CSV."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, SequentialSampler

from ei.data import MultimodalDataset, collate
from ei.data.annotations import class_names, load_label_map
from ei.train.config import ConfigError
from ei.train.data import annotation_dir, data_root
from ei.train.inference import collect_scores, resolve_precision
from ei.train.restore import restore
from ei.train.rundir import RunDir


def _label_map(run: RunDir, beside: Path | None):
    """The run's own classes (classes.json); a label map beside the data must agree with them.
    Runs made before classes.json existed fall back to the label map beside the data."""
    names = run.trained_classes()
    if names is None:
        return beside
    if beside is not None and beside.is_file():
        run.check_classes(class_names(load_label_map(beside)), str(beside))
    return {name: i for i, name in enumerate(names)}


def predict(run_path: str | Path, annotations: str | Path, root: str | Path | None = None,
            stage: str = "ei", out: str | Path | None = None, device: str = "auto",
            batch_size: int = 32) -> Path:
    """Write one CSV row per annotation line: its paths, its labels (if given), a probability
    per class and the prediction. Returns the CSV path (default RUN/predictions/<file>_<stage>.csv).

    Labels are optional (a line may be its paths alone): the model does not use them.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected at least 1, got {batch_size}")
    restored = restore(run_path, stage, device)
    config, preset = restored.config, restored.preset
    root = Path(root) if root is not None else data_root(config, restored.world)
    beside = annotation_dir(config, root) / config.data.labels if config.data.labels else None
    labels = _label_map(restored.run, beside)
    # Read as multi-label so that an empty label field is accepted; labels are only echoed.
    dataset = MultimodalDataset(annotations, labels, root,
                                dataclasses.replace(preset, multi_label=True), train=False,
                                seed=config.seed, unlabeled=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SequentialSampler(dataset),
                        collate_fn=collate, num_workers=config.data.workers)
    precision = resolve_precision(config.runtime.precision, restored.world.device)
    scores, _, indices = collect_scores(restored.model, restored.task, loader, restored.world,
                                        precision, as_probabilities=True)

    names = dataset.class_names
    out = Path(out) if out is not None else (
        restored.run.path / "predictions" / f"{Path(annotations).stem}_{stage.replace('/', '_')}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "line", *preset.modalities, "labels",
                         *(f"p_{n}" for n in names), "predicted"])
        for row, i in zip(scores, indices):
            sample = dataset.samples[i]
            if not np.isfinite(row).all():
                predicted = ""  # no prediction from nan or inf scores
            elif preset.multi_label:
                predicted = ",".join(n for n, p in zip(names, row) if p >= 0.5)
            else:
                predicted = names[int(np.argmax(row))]
            writer.writerow([int(i), sample.line, *(" ".join(p) for p in sample.paths),
                             ",".join(names[k] for k in sample.labels),
                             *(f"{p:.6f}" for p in row), predicted])
    return out

