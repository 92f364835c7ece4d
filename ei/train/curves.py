"""Training curves of a stage as a PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_curves(history: list[dict], path: str | Path, title: str) -> None:
    """Train loss, validation mAP / accuracy and the learning rate against the epoch."""
    if not history:
        return
    nan = float("nan")
    epochs = [r["epoch"] for r in history]
    # Validations within epochs (cadence "interval") at their place in the epoch, else one per
    # epoch at its end.
    vals = [v for r in history for v in r.get("validations", [])] or [
        {"at": r["epoch"], "mAP": r.get("val_mAP", nan), "accuracy": r.get("val_accuracy", nan)}
        for r in history]
    at = [v["at"] for v in vals]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r.get("train_loss", nan) for r in history], marker="o")
    axes[0].set_title("train loss")
    axes[1].plot(at, [v["mAP"] for v in vals], marker="o", label="val mAP")
    axes[1].plot(at, [v["accuracy"] for v in vals], marker="s", label="val accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[1].set_title("validation")
    axes[2].plot(epochs, [r["lr"] for r in history], marker="o")
    axes[2].set_title("learning rate (epoch start)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
