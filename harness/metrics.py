"""Run metrics: one JSON object per line in ``metrics.jsonl`` and the same scalars in TensorBoard,
the step timing behind the throughput figures, and ``Metrics``, the trainer's component that
owns them and their cadence.

Only the main process writes. Lines are flushed as written, so a killed run keeps every line
logged before it died; a reader skips a torn last line.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from harness.files import write_text_atomic
from harness.hardware import HostLoad, NvmlSampler, PeakMemory


class MetricsLogger:
    """Appends to a run's curves from ``open(step)`` on: a resumed run first drops what a
    killed process logged after its checkpoint, so each step is in the files once."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled, self.tensorboard = enabled, tensorboard
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None

    def open(self, from_step: int) -> None:
        """Start logging after step ``from_step`` (the checkpoint's; 0 for a fresh run)."""
        if not self.enabled or self._file is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= from_step]
        if self.path.exists():
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events of later steps (logged before a crash) are hidden from TensorBoard
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=from_step + 1)

    def log(self, record: dict[str, Any], *, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a torn last line from a killed run is skipped)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Meter:
    """Sums of logged terms over a log interval, kept on the device until flushed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.corrupt = 0
        self.duplicates: torch.Tensor | int = 0

    def add(
        self, terms: dict[str, torch.Tensor], corrupt: int, duplicates: torch.Tensor | int = 0
    ) -> None:
        """``terms``: ``TrainStep``'s output, the summed loss first."""
        for key, value in terms.items():
            if value.numel() != 1:
                continue
            value = value.detach().float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1
        self.corrupt += corrupt
        self.duplicates = self.duplicates + duplicates

    def flush(self) -> dict[str, float]:
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).div(self.count).tolist() if keys else []
        out = dict(zip(keys, values, strict=True))
        out["corrupt_samples"] = self.corrupt
        out["duplicate_images"] = int(self.duplicates)
        self.sums, self.count, self.corrupt, self.duplicates = {}, 0, 0, 0
        return out


class StepTiming:
    """Host-side step timing, with the run's peak memory and NVML sampling (a context manager:
    both start on entry). Interval means are exact once the log step has synchronised."""

    WARMUP_INTERVALS = 1  # the first logged interval (compilation, allocator warm-up) is excluded

    def __init__(self, device: torch.device):
        self.data = 0.0
        self.steps = 0
        self.start = time.perf_counter()
        self.intervals: list[dict[str, float]] = []
        self.peak = PeakMemory(device)
        self.gpu = NvmlSampler(device)
        self.host = HostLoad()

    def __enter__(self) -> StepTiming:
        # not this run's peak: the FLOP count's passes, or a shared stage trained before in
        # this process (their freed heap is handed back; the warm-up interval pages it in again)
        self.peak.reset(release_freed=True)
        self.gpu.start()
        self.host.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.gpu.stop()
        self.host.stop()

    def add(self, data_s: float, step_s: float) -> None:
        self.data += data_s
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is left out of the current interval."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def flush_interval(self) -> dict[str, float]:
        now = time.perf_counter()
        wall = now - self.start
        interval = {
            "steps": self.steps,
            "wall_s": wall,
            "step_ms": 1000 * wall / max(1, self.steps),
            "data_ms": 1000 * self.data / max(1, self.steps),
            "samples_per_step": self.steps / max(wall, 1e-9),
        }
        self.intervals.append(interval)
        self.start, self.data, self.steps = now, 0.0, 0
        return interval

    def summary(self, batch_size: int, host_cpu_seconds: float | None = None) -> dict[str, Any]:
        """The run's figures; ``host_cpu_seconds``: CPU time of every rank on this machine."""
        kept = self.intervals[self.WARMUP_INTERVALS :] or self.intervals
        steps = sum(i["steps"] for i in kept)
        wall = sum(i["wall_s"] for i in kept)
        step_ms = [i["step_ms"] for i in kept]
        nan = float("nan")
        quantiles = statistics.quantiles(step_ms, n=10, method="inclusive") if len(kept) > 1 else []
        return {
            "samples_per_s": batch_size * steps / max(wall, 1e-9),
            "step_time_ms_median": statistics.median(step_ms) if step_ms else nan,
            "step_time_ms_p10": quantiles[0] if quantiles else None,  # one interval: no spread
            "step_time_ms_p90": quantiles[-1] if quantiles else None,
            "data_wait_fraction": sum(i["data_ms"] * i["steps"] for i in kept)
            / max(1e-9, 1000 * wall),
            "measured_steps": steps,
            "timing": "means of the intervals between log steps (host clock, synchronised at "
            "each log; the first interval and checkpoint writes left out)",
            "peak_memory_mb": self.peak.peak_mb(),
            "memory_kind": self.peak.kind,
            **{k if k.startswith("gpu_") else f"gpu_{k}": v for k, v in self.gpu.result().items()},
            "host_load": self.host.result(host_cpu_seconds),
        }


class Metrics:
    """A run's curves and speed, with their cadence: a meter of the logged terms (kept on the
    device until a log step), step timing, the progress bar, and metrics.jsonl and TensorBoard
    (written by the main process only)."""

    def __init__(
        self, run_dir: Path, *, device: torch.device, log_every: int, progress_bar: bool,
        batch_size: int, main: bool, name: str,
    ):  # fmt: skip
        self.log_every, self.batch_size, self.name = log_every, batch_size, name
        self.logger = MetricsLogger(run_dir, enabled=main)
        self.meter = Meter(device)
        self.timing = StepTiming(device)
        self.show_bar = main and progress_bar
        self.bar: tqdm | None = None

    def start(self, step: int, total: int) -> None:
        self.logger.open(from_step=step)
        self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                        disable=not self.show_bar, desc=self.name)  # fmt: skip

    def add(self, terms: dict[str, torch.Tensor], batch: dict, duplicates, *, data_s: float,
            step_s: float) -> None:  # fmt: skip
        self.meter.add(terms, int(batch["corrupt"]), duplicates)
        self.timing.add(data_s, step_s)
        self.bar.update(1)

    def due(self, step: int, done: bool) -> bool:
        return done or step % self.log_every == 0

    def log(self, step: int, lr: float, state: Any) -> None:
        """The interval's means (one host sync for them all); the interval's corrupt samples and
        duplicate images are added to ``state``'s counts, which the record carries."""
        if not self.meter.count:
            return
        values = self.meter.flush()
        state.corrupt_samples += values.pop("corrupt_samples")
        state.duplicate_images += values.pop("duplicate_images")
        interval = self.timing.flush_interval()
        record = {
            "samples": step * self.batch_size, "lr": lr, **values,
            "samples_per_s": interval["samples_per_step"] * self.batch_size,
            "step_time_ms": interval["step_ms"], "data_wait_ms": interval["data_ms"],
            "corrupt_samples": state.corrupt_samples, "duplicate_images": state.duplicate_images,
        }  # fmt: skip
        self.logger.log(record, step=step)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()
