"""Run metrics: one JSON object per line in ``metrics.jsonl`` and the same scalars in TensorBoard.

Only the main process writes. Lines are flushed as written, so a killed run keeps every line
logged before it died; a reader skips a torn last line.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import statistics
import threading
from pathlib import Path
from typing import Any

import torch

from harness import host_memory


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

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


class PeakMemory:
    """Peak memory since ``reset`` (or process start): CUDA max_memory_allocated on GPU, peak RSS
    on CPU.

    On Linux the process's RSS high-water mark (VmHWM) is reset by writing 5 to
    /proc/self/clear_refs, so a peak can be taken over the measured steps only; where that is
    not possible the process-lifetime peak (getrusage) is reported and named as such.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"

    def reset(self, *, release_freed: bool = False) -> None:
        """Start a new peak. On CPU, VmHWM restarts from the resident set, which holds the heap
        that earlier work freed (``host_memory.keep_freed_memory`` keeps it): ``release_freed``
        hands that back to the kernel first, so it does not count as this peak. (Not between
        warm-up and timed steps: the timed steps would page their buffers in again.)"""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if release_freed:
            gc.collect()
            host_memory.release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "process peak RSS (lifetime; could not reset)"

    def held_mb(self) -> float:
        """What the process holds now (CUDA allocated, or resident set size), for a baseline."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return (_proc_status_kb("VmRSS") or 0) / 1024

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _proc_status_kb("VmHWM")
        if hwm is None:
            self.kind = "process peak RSS (lifetime, getrusage)"
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return hwm / 1024


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


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
