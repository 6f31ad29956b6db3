"""Measuring tools shared by the benchmarks: clocks with device synchronisation, step-time
statistics, NVML sampling and the machine description written into every result.

Nothing here invents a number: where a quantity cannot be measured (GPU utilisation on a CPU
run, NVML missing) the value is ``None`` and the reason is recorded next to it ("n/a" in tables).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
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


class NvmlSampler:
    """GPU utilisation and memory sampled by a background thread while the steps run.

    ``result()`` is {"gpu_util_mean_pct", "gpu_util_max_pct", "gpu_mem_used_max_mb", "samples",
    "nvml"}; on a CPU run, or when NVML cannot be used, every value is None and "nvml" says why.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device, self.interval_s = device, interval_s
        self.util: list[int] = []
        self.mem: list[int] = []
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None

    def start(self) -> None:
        if self.device.type != "cuda":
            self.reason = "no GPU (CPU run)"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = _nvml_handle(pynvml, self.device)
        except Exception as e:  # NVML missing or the device not found: say so, never guess
            self.reason = f"NVML unavailable: {type(e).__name__}: {e}"
            return
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:  # at least one sample, however short the timed steps
            try:
                self.util.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
                self.mem.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            except Exception as e:
                self.reason = f"NVML query failed: {type(e).__name__}: {e}"
                return
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def result(self) -> dict[str, Any]:
        if not self.util:
            return {
                "gpu_util_mean_pct": None,
                "gpu_util_max_pct": None,
                "gpu_mem_used_max_mb": None,
                "samples": 0,
                "nvml": self.reason or "no samples taken",
            }
        return {
            "gpu_util_mean_pct": statistics.fmean(self.util),
            "gpu_util_max_pct": max(self.util),
            "gpu_mem_used_max_mb": max(self.mem) / 2**20,
            "samples": len(self.util),
            "nvml": self.reason or f"sampled every {self.interval_s * 1000:.0f} ms",
        }


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of ``device``: by UUID (robust to CUDA_VISIBLE_DEVICES), else by index."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


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
