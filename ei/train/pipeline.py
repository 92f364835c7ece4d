"""The whole training procedure of docs/EI_SPEC.md: single-modality models, then EI built from them,
and the late-fusion baseline; each stage is evaluated on the test split with its best
checkpoint, and one table compares them.

A stage whose result.json exists is finished and skipped; one with a last.pt resumes from it.
So ``ei train --resume <run dir>`` continues a killed run wherever it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math

import torch

from . import checkpoint
from .config import Config
from .data import Splits, build_splits, make_loader, open_dataset
from .demo_backbone import resolve_demo_backbone
from .distributed import World
from .inference import loader_metrics, resolve_precision
from .loop import StageSpec, StageTrainer
from .models import SINGLE_PREFIX, build_model, build_task, stage_names, stage_seed
from .rundir import RunDir

LABELS = {"ei": "EI", "late_fusion": "late fusion"}


def stage_label(stage: str) -> str:
    if stage.startswith(SINGLE_PREFIX):
        return f"single ({stage[len(SINGLE_PREFIX):]})"
    return LABELS.get(stage, stage)


def set_runtime(config: Config) -> None:
    if config.runtime.threads is not None:
        torch.set_num_threads(config.runtime.threads)
    if config.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def best_single_modality(results: dict[str, dict]) -> str:
    """The modality whose single model had the best mAP on the training set (docs/EI_SPEC.md's loss
    prior; first on ties)."""
    singles = {s[len(SINGLE_PREFIX):]: r["train_mAP"] for s, r in results.items()
               if s.startswith(SINGLE_PREFIX)}
    return max(singles, key=lambda m: -math.inf if math.isnan(singles[m]) else singles[m])


def loss_prior_modality(config: Config, results: dict[str, dict]) -> str:
    """The modality whose loss prior is lowered (protocol.prior): loss.best_modality as given
    ("fixed"), or the single model with the best training-set mAP ("train_map")."""
    if config.protocol.prior == "fixed":
        return config.loss.best_modality
    return best_single_modality(results)


def evaluate_model(model, task, splits: Splits, split: str, config: Config, world: World,
                   precision: str) -> dict:
    """Metrics of `model` on `split`; the training split is read as for evaluation (no
    augmentation, first image of a multi-image modality)."""
    dataset = splits.get(split)
    if split == "train":
        dataset = open_dataset(config, splits.root, splits.preset, config.data.train, train=False)
    loader = make_loader(dataset, config, config.ei.eval_batch_size or config.ei.batch_size,
                         world, train=False, seed=config.seed)
    return loader_metrics(model, task, loader, world, precision, splits.class_names)


def run_stage(stage: str, config: Config, splits: Splits, run: RunDir, world: World,
              results: dict[str, dict]) -> dict:
    directory = run.stage_dir(stage)
    done = directory / "result.json"
    if done.is_file():
        if world.is_main:  # a resumed run: say what it skips
            print(f"{stage}: already trained ({done}), not trained again", flush=True)
        return json.loads(done.read_text(encoding="utf-8"))

    optim = config.single if stage.startswith(SINGLE_PREFIX) else config.ei
    seed = stage_seed(config.seed, stage)
    best_modality = None
    singles = None
    if not stage.startswith(SINGLE_PREFIX):
        best_modality = loss_prior_modality(config, results)
        if world.is_main and config.runtime.progress:
            how = ("loss.best_modality" if config.protocol.prior == "fixed"
                   else "best single-modality train mAP")
            print(f"loss prior: best modality {best_modality!r} ({how})", flush=True)
        singles = {m: run.stage_dir(SINGLE_PREFIX + m) / "best.pt" for m in splits.preset.modalities}
    # The same seed on every rank gives every rank the same initial model (DDP checks it too).
    torch.manual_seed(seed)
    model = build_model(config, splits.preset, stage, singles=singles)
    task = build_task(config, splits.preset, stage, best_modality)
    precision = resolve_precision(config.runtime.precision, world.device)
    spec = StageSpec(
        name=stage, directory=directory, task=task, optim=optim, world=world,
        precision=precision, progress=config.runtime.progress,
        section="single" if stage.startswith(SINGLE_PREFIX) else "ei",
        validation=config.protocol.validation, schedule=config.protocol.schedule,
        # Without L_aa the auxiliary classifiers get no gradient, which DDP must be told.
        find_unused_parameters=not stage.startswith(SINGLE_PREFIX) and not config.loss.use_aux,
    )
    train_loader = make_loader(splits.train, config, optim.batch_size, world, train=True, seed=seed)
    val_loader = make_loader(splits.val, config, optim.eval_batch_size or optim.batch_size, world,
                             train=False, seed=seed)
    trainer = StageTrainer(spec, model, train_loader, val_loader, splits.class_names)
    if trainer.resume_if_possible() and world.is_main:
        print(f"{stage}: resumed after epoch {trainer.epoch}", flush=True)
    summary = trainer.fit()

    model.load_state_dict(checkpoint.load(directory / "best.pt", "best checkpoint"))
    test = evaluate_model(trainer.net, task, splits, "test", config, world, precision)
    result = {"stage": stage, **summary, "best_modality": best_modality, "test": test}
    if stage.startswith(SINGLE_PREFIX):  # what the loss prior of stage two is chosen by
        train = evaluate_model(trainer.net, task, splits, "train", config, world, precision)
        result["train_mAP"] = train["mAP"]
    if world.is_main:
        checkpoint.atomic_write_text(json.dumps(result, indent=1), done)
    return result


def summary_rows(results: dict[str, dict]) -> list[dict]:
    return [{"model": stage_label(s), "stage": s, "test_mAP": r["test"]["mAP"],
             "test_accuracy": r["test"]["accuracy"], "val_mAP": r["best_val_mAP"],
             "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"]}
            for s, r in results.items()]


def format_summary(results: dict[str, dict]) -> str:
    rows = summary_rows(results)
    width = max(len("model"), *(len(r["model"]) for r in rows))
    header = f"{'model':<{width}}  {'test mAP':>8}  {'test acc':>8}  {'val mAP':>8}  {'best epoch':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        epoch = f"{r['best_epoch']}/{r['epochs_run']}"
        lines.append(f"{r['model']:<{width}}  {r['test_mAP']:>8.4f}  {r['test_accuracy']:>8.4f}  "
                     f"{r['val_mAP']:>8.4f}  {epoch:>10}")
    return "\n".join(lines)


def write_summary(results: dict[str, dict], run: RunDir) -> None:
    rows = summary_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(buffer.getvalue(), run.path / "summary.csv")
    checkpoint.atomic_write_text(json.dumps(rows, indent=1), run.path / "summary.json")


def train_all(config: Config, run: RunDir, world: World) -> dict[str, dict]:
    """Every stage of the run, in order; returns stage -> result."""
    set_runtime(config)
    splits = build_splits(config, world)
    if world.is_main:
        run.record_classes(splits.class_names, f"the label map of {splits.root}")
    config = resolve_demo_backbone(config, world)
    results: dict[str, dict] = {}
    for stage in stage_names(config, splits.preset):
        if world.is_main and config.runtime.progress:
            print(f"== {stage_label(stage)} ==", flush=True)
        results[stage] = run_stage(stage, config, splits, run, world, results)
    if world.is_main:
        write_summary(results, run)
    return results
