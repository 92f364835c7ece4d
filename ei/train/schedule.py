"""Learning-rate schedules, updated every iteration (config protocol.schedule).

- warmup_cosine (docs/EI_SPEC.md, Training): linear warm-up, then cosine down to a floor.
- cyclic (the authors' public code): torch's CyclicLR as they configure it, written out here so
  that its whole state is one iteration count like the other's. The lr climbs from `min_lr` to
  the cycle's peak over `half_cycle` iterations and back down over as many; the peak is `lr` in
  the first cycle and shrinks by `decay` per cycle. CyclicLR also cycles SGD's momentum by
  default (between 0.9 at the floor and 0.8 at the peak), overriding the configured one, and
  the authors keep that default: so does this.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

# torch.optim.lr_scheduler.CyclicLR's default momentum range (base_momentum, max_momentum).
CYCLIC_MOMENTUM = (0.8, 0.9)


def lr_at(iteration: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The warmup_cosine learning rate of (0-based) `iteration` out of `total`.

    Warm-up rises linearly to `base_lr` at iteration `warmup - 1`; the cosine then falls from
    `base_lr` to `min_lr`, which the last iteration (`total - 1`) reaches. Past `total` it stays
    at `min_lr`.
    """
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (iteration - warmup) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cyclic_height(iteration: int, half_cycle: int, decay: float) -> float:
    """How far up its range (0 = floor, 1 = first peak) the cyclic schedule is at `iteration`:
    a triangle wave of period 2 * half_cycle, scaled by decay ** (cycle - 1) in cycle 1, 2, ..."""
    cycle = 1 + iteration // (2 * half_cycle)
    position = iteration % (2 * half_cycle)  # iterations into the cycle
    triangle = position / half_cycle if position <= half_cycle else 2 - position / half_cycle
    return triangle * decay ** (cycle - 1)


class IterationSchedule:
    """Sets every parameter group's lr (and, cyclic, momentum) before each step; `step()` after
    each optimizer step. Its whole state is the iteration count, so a resumed run continues
    the same curve."""

    def __init__(self, optimizer: Optimizer, base_lr: float, min_lr: float, *, warmup: int = 0,
                 total: int = 1, half_cycle: int | None = None, decay: float = 0.8) -> None:
        """`half_cycle` given: the cyclic schedule (warmup and total unused), else
        warmup_cosine."""
        if half_cycle is not None and half_cycle < 1:
            raise ValueError(f"half_cycle: must be >= 1, got {half_cycle}")
        self.optimizer = optimizer
        self.base_lr, self.min_lr, self.warmup, self.total = base_lr, min_lr, warmup, total
        self.half_cycle, self.decay = half_cycle, decay
        self.iteration = 0
        self._apply()

    @property
    def lr(self) -> float:
        if self.half_cycle is None:
            return lr_at(self.iteration, self.base_lr, self.min_lr, self.warmup, self.total)
        height = cyclic_height(self.iteration, self.half_cycle, self.decay)
        return self.min_lr + (self.base_lr - self.min_lr) * height

    def _apply(self) -> None:
        lr = self.lr
        momentum = None
        if self.half_cycle is not None:
            low, high = CYCLIC_MOMENTUM
            momentum = high - (high - low) * cyclic_height(self.iteration, self.half_cycle,
                                                           self.decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if momentum is not None:
                group["momentum"] = momentum

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._apply()
