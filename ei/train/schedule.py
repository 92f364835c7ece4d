"""Learning-rate schedule of docs/EI_SPEC.md (Training): linear warm-up, then cosine down to a
floor, updated every iteration."""

from __future__ import annotations

import math

from torch.optim import Optimizer


def lr_at(iteration: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The learning rate of (0-based) `iteration` out of `total`.

    Warm-up rises linearly to `base_lr` at iteration `warmup - 1`; the cosine then falls from
    `base_lr` to `min_lr`, which the last iteration (`total - 1`) reaches. Past `total` it stays
    at `min_lr`.
    """
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (iteration - warmup) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets every parameter group's lr before each step; `step()` after each optimizer step.

    Its whole state is the iteration count, so a resumed run continues the same curve.
    """

    def __init__(self, optimizer: Optimizer, base_lr: float, min_lr: float, warmup: int,
                 total: int) -> None:
        self.optimizer = optimizer
        self.base_lr, self.min_lr, self.warmup, self.total = base_lr, min_lr, warmup, total
        self.iteration = 0
        self._apply()

    @property
    def lr(self) -> float:
        return lr_at(self.iteration, self.base_lr, self.min_lr, self.warmup, self.total)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._apply()
