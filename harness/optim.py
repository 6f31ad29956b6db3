"""Optimisation: AdamW over the method's parameter groups, the warmup-cosine schedule and the
budget clock, as one component (``Optimization``) the trainer steps and checkpoints.

Budgets are counted in samples: ``train_samples`` and ``warmup_samples`` become steps for the
configured batch size, so a smaller batch takes more steps for the same data (the sweep's
equal-footing rule); ``TrainConfig`` derives them, and run.json records them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from harness import distributed
from harness.specs import TrainConfig
from methods.base import Method


def lr_multiplier(
    step: int, *, warmup: int, total: int, min_ratio: float, progress: float | None = None
) -> float:
    """Linear warmup to 1, then cosine to ``min_ratio`` at the end of the budget.

    ``progress`` (fraction of the budget used, for time budgets) overrides the step-based one.
    """
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BudgetClock:
    """Training time used so far, across resumes (for the wall-clock budget).

    ``progress`` is the fraction of ``seconds`` used as last agreed by all ranks (the largest
    rank's, at log steps): the learning-rate schedule reads it rather than each rank's own
    clock, so every rank steps with the same rate, and no step waits for a collective.
    """

    def __init__(self, seconds: float = 0.0, used: float = 0.0):
        self.seconds, self.used, self._since = seconds, used, time.perf_counter()
        self.progress = self._fraction_of(used)

    def elapsed(self) -> float:
        return self.used + time.perf_counter() - self._since

    def restore(self, used: float) -> None:
        """Continue from a checkpoint's ``used`` seconds (the same number on every rank)."""
        self.used, self._since = used, time.perf_counter()
        self.progress = self._fraction_of(used)

    def agree(self) -> float:
        """Set ``progress`` to the largest fraction used on any rank, and return it."""
        self.progress = distributed.max_over_ranks(self._fraction_of(self.elapsed()))
        return self.progress

    def _fraction_of(self, seconds: float) -> float:
        return min(1.0, seconds / self.seconds) if self.seconds > 0 else 0.0


def build_optimizer(
    method: Method, model: nn.Module, config: TrainConfig, clock: BudgetClock | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = method.param_groups(model, lr=config.scaled_lr, weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        groups, betas=(config.beta1, config.beta2), eps=config.eps, fused=fused
    )

    def schedule(step: int) -> float:
        timed = clock is not None and clock.seconds > 0  # the cosine follows time, not steps
        return lr_multiplier(
            step,
            warmup=config.warmup_steps,
            total=config.total_steps,
            min_ratio=config.min_lr_ratio,
            progress=clock.progress if timed else None,
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class Optimization:
    """The optimiser, its schedule and the training-time clock of one run."""

    def __init__(self, method: Method, model: nn.Module, config: TrainConfig):
        self.config = config
        self.clock = BudgetClock(config.train_seconds if config.budget == "wallclock" else 0.0)
        self.optimizer, self.scheduler = build_optimizer(method, model, config, self.clock)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.config.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()

    def time_is_up(self) -> bool:
        """For a time budget: whether it is spent, as all ranks agree (a collective)."""
        return self.clock.seconds > 0 and self.clock.agree() >= 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "train_seconds_used": self.clock.elapsed()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.clock.restore(state.get("train_seconds_used", 0.0))
