"""One stage's training: epochs of SGD, validation every epoch (or, with the authors' cadence,
every int(samples / batch) + 1 iterations), best checkpoint by val mAP, early stopping after
`patience` validations without improvement, and a checkpoint at every epoch end that a killed
run resumes from.

Files in the stage directory (written by rank 0 only):
  last.pt        full training state at the end of the last finished epoch (resume point)
  best.pt        the model's state dict at its best validation mAP
  metrics.jsonl  one record per epoch (with the validations within it, if any); rewritten from
                 the checkpointed history, so a resumed run never has duplicate or orphaned
                 lines
  curves.png     training curves, drawn when the stage ends

Why a resume ends exactly where an uninterrupted run would: the data order comes from
DistributedSampler(seed, epoch), each sample's augmentation from (seed, epoch, index), the
learning rate from the iteration count, and every RNG state, the optimizer's momentum and the
model are saved at the epoch end the resumed run restarts from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint
from .config import OptimConfig
from .curves import plot_curves
from .distributed import World, all_ranks, barrier
from .diverged import TrainingDiverged
from .inference import autocast, loader_metrics
from .progress import progress_bar
from .schedule import IterationSchedule
from .tasks import to_device


@dataclass
class StageSpec:
    """What a stage needs besides its model: where it writes, its task, how it runs."""

    name: str
    directory: Path
    task: object
    optim: OptimConfig
    world: World
    precision: str  # resolved: fp32, bf16 or fp16
    progress: bool = True
    find_unused_parameters: bool = False
    # "epoch": validate after every epoch; "interval": every int(training samples / global
    # batch) + 1 iterations and before the first (the authors' cadence; protocol.validation).
    validation: str = "epoch"
    schedule: str = "warmup_cosine"  # or "cyclic" (protocol.schedule, ei.train.schedule)
    section: str = "ei"  # the config section of its optimiser settings (ei or single)


def _metrics_summary(metrics: dict) -> dict:
    return {"mAP": metrics["mAP"], "accuracy": metrics["accuracy"], "mAUC": metrics["mAUC"]}


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


class StageTrainer:
    def __init__(self, spec: StageSpec, model: nn.Module, train_loader, val_loader,
                 class_names: list[str]) -> None:
        self.spec, self.model, self.class_names = spec, model, class_names
        self.train_loader, self.val_loader = train_loader, val_loader
        world, optim = spec.world, spec.optim
        model.to(world.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{spec.name}: the model has no trainable parameter")
        self.net = model
        if world.distributed:
            ids = [world.device.index] if world.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=spec.find_unused_parameters)
        self.optimizer = torch.optim.SGD(self.params, lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay)
        per_epoch = len(train_loader)
        # The authors' validation interval: int(training samples / global batch) + 1 iterations.
        interval = len(train_loader.dataset) // (optim.batch_size * world.size) + 1
        self.val_every = interval if spec.validation == "interval" else None
        # Their cyclic lr rises over 4 validation intervals and falls over 4.
        self.scheduler = IterationSchedule(
            self.optimizer, optim.lr, optim.min_lr, warmup=round(optim.warmup_epochs * per_epoch),
            total=optim.epochs * per_epoch, half_cycle=4 * interval if spec.schedule == "cyclic"
            else None)
        # fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none).
        self.scaler = torch.amp.GradScaler(world.device.type) if spec.precision == "fp16" else None
        self.epoch = 0  # epochs finished
        self.best = -math.inf
        self.best_epoch = -1  # the epoch of the best validation
        self.best_accuracy = math.nan  # its validation accuracy
        self.bad_epochs = 0  # validations since the last improvement
        self.stopped = False
        self.history: list[dict] = []

    # -- checkpointing ----------------------------------------------------------------------

    @property
    def last_path(self) -> Path:
        return self.spec.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.spec.directory / "best.pt"

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": checkpoint.rng_state(),
            "epoch": self.epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_accuracy": self.best_accuracy,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.epoch, self.best = state["epoch"], state["best"]
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]
        self.stopped, self.history = state["stopped"], json.loads(state["history"])
        # Checkpoints from before best_accuracy was kept: the best epoch's record has it.
        self.best_accuracy = state.get("best_accuracy", self.history[self.best_epoch - 1].get(
            "val_accuracy", math.nan) if self.best_epoch > 0 else math.nan)

    def resume_if_possible(self) -> bool:
        """Load last.pt when the stage has one; every rank reads the same file."""
        if not self.last_path.is_file():
            return False
        self.load_state_dict(checkpoint.load(self.last_path))
        return True

    def _write_epoch_files(self) -> None:
        if not self.spec.world.is_main:
            return
        # best.pt is written when a validation improves, before this: if the run dies in
        # between, the resumed run redoes the epoch and writes the same best.pt again.
        checkpoint.atomic_save(self.state_dict(), self.last_path)
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        checkpoint.atomic_write_text(lines, self.spec.directory / "metrics.jsonl")

    # -- training ---------------------------------------------------------------------------

    def _bar(self, total: int, desc: str, unit: str = "sample"):
        show = self.spec.progress and self.spec.world.is_main
        return progress_bar(total, desc, unit, show)

    def consider(self, val: dict) -> None:
        """Count one validation: best checkpoint, patience, early stop."""
        # nan (no positive in the split) never counts as an improvement, except that the
        # first validation always gives a best.pt to evaluate.
        improved = self.best_epoch < 0 or val["mAP"] > self.best
        if improved:
            self.best = val["mAP"] if not math.isnan(val["mAP"]) else -math.inf
            self.best_epoch, self.best_accuracy = self.epoch + 1, val["accuracy"]
            self.bad_epochs = 0
            if self.spec.world.is_main:
                checkpoint.atomic_save(self.model.state_dict(), self.best_path)
        else:
            self.bad_epochs += 1
        patience = self.spec.optim.patience
        self.stopped = patience > 0 and self.bad_epochs >= patience

    def _validate_within(self) -> dict:
        """A validation between training steps (cadence "interval"): back to train mode after."""
        val = _metrics_summary(self.validate())
        self.consider(val)
        self.net.train()
        return val

    def train_epoch(self) -> dict:
        """One epoch of steps (fewer when a validation within it stops the stage); with the
        "interval" cadence its record holds those validations."""
        spec, world, loader = self.spec, self.spec.world, self.train_loader
        loader.sampler.set_epoch(self.epoch)
        # Augmentation and random image choices are seeded by the dataset's epoch.
        dataset = loader.dataset
        while not hasattr(dataset, "set_epoch") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.epoch)

        self.net.train()
        totals: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        desc = f"{spec.name} epoch {self.epoch + 1}/{spec.optim.epochs}"
        validations = []
        with self._bar(len(loader.sampler), desc) as bar:
            for step, batch in enumerate(loader):
                iteration = self.epoch * len(loader) + step
                if self.val_every is not None and iteration % self.val_every == 0:
                    # "at": in epochs, as the curves' x axis (0 = before the first step).
                    validations.append({"iteration": iteration, "at": iteration / len(loader),
                                        **self._validate_within()})
                    if self.stopped:
                        break
                batch = to_device(batch, world.device)
                with autocast(world.device, spec.precision):
                    loss, terms = spec.task.loss(self.net, batch)
                self._check_finite(loss, terms, step)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.scheduler.step()
                n = len(batch["index"])
                seen += n
                for key, value in {"loss": loss.detach(), **terms}.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * n
                rate = seen * world.size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}", refresh=False)
                bar.update(n)
        elapsed = time.perf_counter() - start
        # Loss means of this rank's shard; the shards are the same size, close enough for a log.
        record = {f"train_{k}": v / max(1, seen) for k, v in totals.items()}
        record["samples_per_s"] = seen * world.size / max(elapsed, 1e-9)
        if self.val_every is not None:
            record["validations"] = validations
            if validations:  # the epoch's columns: its last validation
                record.update({f"val_{k}": v for k, v in validations[-1].items()
                               if k not in ("iteration", "at")})
        return record

    def _check_finite(self, loss: torch.Tensor, terms: dict, step: int) -> None:
        """Stop before a nan or inf loss reaches the weights (fp16's loss scaling would skip
        such steps one by one, never saying so): last.pt and best.pt keep the last good state,
        and the run's results are never computed from a diverged model."""
        if all_ranks(bool(torch.isfinite(loss.detach())), self.spec.world, loss.device):
            return
        spec, value = self.spec, float(loss.detach())
        parts = ", ".join(f"{k} {float(v):.4g}" for k, v in terms.items())
        what = (f"the training loss is {value:.4g}" + (f" ({parts})" if parts else "")
                if not math.isfinite(value) else "another rank's training loss is not finite")
        raise TrainingDiverged(
            f"{spec.name}: {what} at epoch {self.epoch + 1}, step {step + 1},"
            f" learning rate {self.scheduler.lr:.4g}: training diverged. Nothing of this epoch"
            " was saved" + (f" ({self.last_path.name} holds epoch {self.epoch})" if self.epoch
                            else "") + f". Start a new run with a smaller {spec.section}.lr"
            + (", or runtime.precision=bf16 (fp16 overflows sooner)" if spec.precision == "fp16"
               else "") + ".")

    def validate(self) -> dict:
        bar = self._bar(len(self.val_loader.sampler), f"{self.spec.name} validation")
        with bar:
            return loader_metrics(self.net, self.spec.task, self.val_loader, self.spec.world,
                                  self.spec.precision, self.class_names, bar)

    def fit(self) -> dict:
        """Train until the epochs are done or early stopping; returns the stage summary."""
        spec = self.spec
        if spec.world.is_main:
            spec.directory.mkdir(parents=True, exist_ok=True)
        barrier(spec.world)
        while self.epoch < spec.optim.epochs and not self.stopped:
            start = time.perf_counter()
            record = {"epoch": self.epoch + 1, "lr": self.scheduler.lr, **self.train_epoch()}
            if self.val_every is None:
                val = _metrics_summary(self.validate())
                record.update({f"val_{k}": v for k, v in val.items()})
                self.consider(val)
            self.epoch += 1
            record["seconds"] = time.perf_counter() - start
            self.history.append(record)
            self._write_epoch_files()
            if spec.world.is_main and spec.progress:
                tqdm.write(
                    f"{spec.name} epoch {self.epoch}/{spec.optim.epochs}: loss "
                    f"{_fmt(record.get('train_loss', math.nan))}, val mAP "
                    f"{_fmt(record.get('val_mAP', math.nan))} acc "
                    f"{_fmt(record.get('val_accuracy', math.nan))} (best {_fmt(self.best)} at "
                    f"epoch {self.best_epoch}), {record['samples_per_s']:.0f} samples/s"
                    + (", early stop" if self.stopped else "")
                )
            barrier(spec.world)
        if spec.world.is_main:
            plot_curves(self.history, spec.directory / "curves.png", spec.name)
        return {"best_epoch": self.best_epoch, "best_val_mAP": self.best,
                "best_val_accuracy": self.best_accuracy,
                "epochs_run": self.epoch, "stopped_early": self.stopped}
