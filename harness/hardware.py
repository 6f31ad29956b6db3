"""What the machine did while the steps ran: peak memory, GPU utilisation (NVML) and the host's
CPU load, each measured and named as what it is, never guessed."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from harness import host_memory


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


class HostLoad:
    """What the machine's CPUs did while the steps ran: this run's share and everyone else's.

    Read from /proc (Linux) when the steps start and end: the machine's busy time over all its
    CPUs (``/proc/stat``), the CPU time of this process and its children (the loader workers),
    and the 1-minute load average. ``cpu_share_others`` is the share of the machine's CPU time
    that other processes used meanwhile; above ``CONTENDED_ABOVE`` the run's speed figures
    were measured on a shared machine and say so. Where /proc is missing every value is None.
    """

    CONTENDED_ABOVE = 0.10

    def __init__(self) -> None:
        self._start: tuple[float, tuple[int, int] | None, float] | None = None
        self._end: tuple[float, tuple[int, int] | None, float] | None = None
        self._load: list[float | None] = []

    def start(self) -> None:
        self._start = (time.perf_counter(), _machine_jiffies(), own_cpu_seconds())
        self._load = [_load_average()]

    def stop(self) -> None:
        self._end = (time.perf_counter(), _machine_jiffies(), own_cpu_seconds())
        self._load.append(_load_average())

    def own_seconds(self) -> float:
        """CPU seconds this process and its children used between start and stop."""
        return max(0.0, self._end[2] - self._start[2]) if self._start and self._end else 0.0

    def result(self, own_seconds: float | None = None) -> dict[str, Any]:
        """The figures; ``own_seconds``: the run's CPU time on this machine, every rank's
        (default: this process's)."""
        cpus = os.cpu_count() or 1
        out: dict[str, Any] = {"cpus": cpus, "load_avg_1m": self._load or None}
        if not (self._start and self._end and self._start[1] and self._end[1]):
            return {**out, "cpu_share_busy": None, "cpu_share_own": None,
                    "cpu_share_others": None, "contended": None}  # fmt: skip
        wall = max(self._end[0] - self._start[0], 1e-9)
        busy = self._end[1][0] - self._start[1][0]
        total = max(self._end[1][1] - self._start[1][1], 1)
        own = (self.own_seconds() if own_seconds is None else own_seconds) / (wall * cpus)
        others = max(0.0, busy / total - own)
        return {
            **out,
            "cpu_share_busy": busy / total,
            "cpu_share_own": own,
            "cpu_share_others": others,
            "contended": others > self.CONTENDED_ABOVE,
        }


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is counted in user time already
    return total - idle, total


def own_cpu_seconds() -> float:
    """CPU seconds used by this process (all its threads) and its live children, from /proc."""
    me, total = os.getpid(), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid, ppid = int(stat.parent.name), int(fields[1])
        if me in (pid, ppid):
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
