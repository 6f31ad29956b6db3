"""Measuring tools shared by the benchmarks: clocks with device synchronisation, step-time
statistics and the machine description written into every result (NVML sampling lives in
``harness.metrics``: training runs use it too).

Nothing here invents a number: where a quantity cannot be measured (GPU utilisation on a CPU
run, NVML missing) the value is ``None`` and the reason is recorded next to it ("n/a" in tables).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

NA = "n/a"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Host clock after the device has finished what was queued so far."""
    sync(device)
    return time.perf_counter()


def summarise_ms(seconds: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (milliseconds) of per-step durations, and how many there were."""
    ms = [1000 * s for s in seconds]
    p10, p90 = np.percentile(ms, [10, 90]).tolist() if ms else (float("nan"), float("nan"))
    return {
        "median_ms": statistics.median(ms) if ms else float("nan"),
        "p10_ms": p10,  # linear interpolation between the closest ranks
        "p90_ms": p90,
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "steps": len(ms),
    }


# ---------------------------------------------------------------- NVML


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; written into every JSON and table header."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"
        ),
        "python": platform.python_version(),
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except (ImportError, AttributeError):
        info["open_clip"] = NA
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the machine was around a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
