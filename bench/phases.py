"""The three timed passes of a benchmark cell, all on the trainer's own code path.

1. ``time_steps``: ``Trainer.fit`` itself (real loader, logging, progress bar), with the device
   synchronised only at step boundaries by the trainer's ``on_step`` hook. Median, p10, p90.
2. ``time_phases``: a separate, instrumented pass through the same step pieces
   (``Trainer.forward`` / ``backward`` / ``optimizer_step``), synchronised between phases, so
   phase times include that synchronisation overhead and do not add up to the step time of pass 1.
3. ``time_loader``: the same loader configuration iterated alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from bench.measure import now, summarise_ms
from harness.data.loader import prepare_batch, train_loader
from harness.hardware import NvmlSampler, PeakMemory
from harness.trainer import Trainer

PHASES = (
    "data_wait",
    "prepare",
    "forward",
    "frozen_forward",
    "loss",
    "backward",
    "optimizer",
    "communication",
)
PHASES_NOTE = (
    "phase times come from a separate instrumented pass, synchronised between phases (so they "
    "include that overhead and need not sum to the step time); forward = the method's forward "
    "incl. encoders (and any frozen module, shown again as frozen_forward), loss = Method.loss, "
    "optimizer = clip + step + scheduler + after_step, communication = DDP gradient all-reduce "
    "(n/a in one process; method-level gathers are inside forward/loss)"
)


# ---------------------------------------------------------------- 1. the trainer's steps


def time_steps(trainer: Trainer, *, warmup: int) -> dict[str, Any]:
    """Run ``trainer.fit()`` (its budget is warmup + measured steps) and time each step.

    Peak memory and NVML sampling cover the measured steps only (reset / started when the
    warm-up ends). Returns the per-step summary, the trainer's own throughput summary, peak
    memory and the GPU samples.
    """
    if warmup < 1:
        raise ValueError("at least one warm-up step is needed (the first step has no start time)")
    device = trainer.dist.device
    stamps: list[float] = []
    peak, gpu = PeakMemory(device), NvmlSampler(device)

    def on_step(step: int) -> None:
        stamps.append(now(device))  # the only device sync: at the step boundary
        if step == warmup:
            peak.reset()
            gpu.start()

    trainer.on_step = on_step
    try:
        reported = trainer.fit()
    finally:
        trainer.on_step = None
        gpu.stop()
    durations = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]
    return {
        "step": summarise_ms(durations),
        "trainer_reported": reported,
        "peak_memory_mb": peak.peak_mb(),
        "memory_kind": peak.kind,
        "gpu": gpu.result(),
    }


# ---------------------------------------------------------------- 2. the phases


class _LossTimer:
    """Wraps ``method.loss`` (an instance attribute shadows the class's) to time it."""

    def __init__(self, method: nn.Module, device: torch.device):
        self.method, self.device, self.seconds = method, device, 0.0
        original = type(method).loss.__get__(method)

        def timed(outputs):
            start = now(device)
            terms = original(outputs)
            self.seconds += now(device) - start
            return terms

        method.loss = timed

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        del self.method.loss


class _FrozenTimer:
    """Time spent in the method's frozen modules (a teacher), from forward hooks.

    Hooks sit on each frozen module and its direct children; a depth counter times only the
    outermost calls, so nested calls are not counted twice. Work a frozen module does outside
    module calls (e.g. a projection matmul) is not included: a slight underestimate.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device):
        self.device, self.seconds, self.depth, self.start = device, 0.0, 0, 0.0
        self.present = bool(modules)
        self.handles = []
        for module in modules.values():
            for sub in (module, *module.children()):
                self.handles.append(sub.register_forward_pre_hook(self._enter))
                self.handles.append(sub.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        if self.depth == 0:
            self.start = now(self.device)
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.seconds += now(self.device) - self.start

    def pop(self) -> float | None:
        seconds, self.seconds = self.seconds, 0.0
        return seconds if self.present else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_phases(
    trainer: Trainer,
    *,
    warmup: int,
    steps: int,
    comm_seconds: Callable[[], float | None] = lambda: None,
) -> dict[str, Any]:
    """Per-phase medians (ms) over ``steps`` instrumented steps after ``warmup`` of them.

    ``comm_seconds`` returns (and resets) the DDP all-reduce time of the last step, or None in a
    single process (see ``bench.comm``).
    """
    device = trainer.dist.device
    loader = iter(train_loader(**trainer.loader_args, skip_batches=trainer.state.step))
    loss_timer = _LossTimer(trainer.method, device)
    frozen = _FrozenTimer(trainer.method.frozen_modules(), device)
    trainer.step_module.train()
    rows: list[dict[str, float | None]] = []
    try:
        for i in range(warmup + steps):
            row = _one_phased_step(trainer, loader, loss_timer, frozen, comm_seconds)
            if i >= warmup:
                rows.append(row)
    finally:
        loss_timer.remove()
        frozen.remove()
    return {
        name: summarise_ms([r[name] for r in rows]) if rows[0][name] is not None else None
        for name in PHASES
    }


def _one_phased_step(
    trainer: Trainer,
    loader: Iterator[dict[str, Any]],
    loss_timer: _LossTimer,
    frozen: _FrozenTimer,
    comm_seconds: Callable[[], float | None],
) -> dict[str, float | None]:
    device = trainer.dist.device
    t0 = now(device)
    batch = next(loader)
    t1 = now(device)
    prepared = prepare_batch(batch, device)
    t2 = now(device)
    loss = trainer.forward(prepared)["loss"]
    t3 = now(device)
    trainer.backward(loss)
    t4 = now(device)
    trainer.optimizer_step()
    t5 = now(device)
    loss_s, frozen_s, comm_s = loss_timer.pop(), frozen.pop(), comm_seconds()
    return {
        "data_wait": t1 - t0,
        "prepare": t2 - t1,
        "forward": t3 - t2 - loss_s,
        "frozen_forward": frozen_s,
        "loss": loss_s,
        "backward": t4 - t3 - (comm_s or 0.0),
        "optimizer": t5 - t4,
        "communication": comm_s,
    }


# ---------------------------------------------------------------- 3. the loader alone


def time_loader(trainer: Trainer, *, warmup: int, batches: int) -> dict[str, Any]:
    """The training loader's configuration iterated with nothing else running in this process:
    mean time per batch over ``batches`` batches after ``warmup`` of them.

    With W workers, all start together and their first batches arrive as one burst, so the
    warm-up is at least one round of W batches and the timed part whole rounds, at least three:
    timing fewer batches than workers measured batches already waiting in the queue (a 12-worker
    loader showed 876k samples/s on an H100 machine)."""
    workers = max(1, trainer.loader_args["config"].num_workers)
    warmup = max(warmup, workers)
    batches = math.ceil(max(batches, 3 * workers) / workers) * workers
    loader = iter(train_loader(**trainer.loader_args))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    intervals = []
    for _ in range(batches):
        t = time.perf_counter()
        next(loader)
        intervals.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    batch = trainer.loader_args["per_rank_batch"]
    del loader  # shuts the workers down
    return {
        "ms_per_batch": 1000 * total / batches,
        "median_ms": summarise_ms(intervals)["median_ms"],
        "samples_per_s": batch * batches / total,
        "batches": batches,
        "num_workers": trainer.loader_args["config"].num_workers,
    }
