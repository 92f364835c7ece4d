"""``ei evaluate``: metrics of a run's trained models on one split, as tables and CSV files."""

from __future__ import annotations

from pathlib import Path

from ei.metrics import format_table, write_csv
from ei.train.config import Config
from ei.train.data import build_splits, make_loader, resolve_preset
from ei.train.inference import loader_metrics, resolve_precision
from ei.train.models import stage_names
from ei.train.pipeline import stage_label
from ei.train.restore import Restored, restore, trained_stages
from ei.train.rundir import RunDir, RunDirError


def evaluate_stage(restored: Restored, split: str, splits=None) -> dict:
    config: Config = restored.config
    splits = splits or build_splits(config, restored.world)
    loader = make_loader(splits.get(split), config, config.ei.eval_batch_size or config.ei.batch_size,
                         restored.world, train=False, seed=config.seed)
    precision = resolve_precision(config.runtime.precision, restored.world.device)
    return loader_metrics(restored.model, restored.task, loader, restored.world, precision,
                          splits.class_names)


def evaluate_run(run_path: str | Path, split: str = "test", stages: list[str] | None = None,
                 device: str = "auto", out_dir: str | Path | None = None) -> dict[str, dict]:
    """Metrics of each stage (default: every trained one); prints a table per stage and writes
    <out_dir or run/eval>/<stage>_<split>.csv."""
    run = RunDir.open(run_path)
    config = run.load_config()
    if stages is None:
        preset = resolve_preset(config)
        stages = trained_stages(run, config, preset)
        if not stages:
            raise RunDirError(f"no trained model in {run.path} (no best.pt in any stage folder)")
        untrained = [s for s in stage_names(config, preset) if s not in stages]
        if untrained:  # a run still training, or a checkpoint removed: say what is left out
            print(f"Not evaluated (no best.pt yet): {', '.join(untrained)}")
    out = Path(out_dir) if out_dir is not None else run.path / "eval"
    out.mkdir(parents=True, exist_ok=True)
    results, splits = {}, None
    for stage in stages:
        restored = restore(run.path, stage, device)
        if splits is None:
            splits = build_splits(config, restored.world)
            run.check_classes(splits.class_names, f"the label map of {splits.root}")
        metrics = evaluate_stage(restored, split, splits)
        path = out / f"{stage.replace('/', '_')}_{split}.csv"
        write_csv(metrics, path)
        print(f"\n{stage_label(stage)} on {split} ({metrics['num_samples']} samples): "
              f"mAP {metrics['mAP']:.4f}, accuracy {metrics['accuracy']:.4f}")
        print(format_table(metrics))
        print(f"-> {path}")
        results[stage] = metrics
    return results

