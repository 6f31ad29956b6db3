"""What the harness measures besides quality: the trainer's step timing (checkpoint writes left
out, spread, NVML), the machine's load while it ran, the cached CPU peak, chance levels."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.metrics import StepTiming


def test_time_inside_paused_is_left_out_of_the_interval():
    with StepTiming(torch.device("cpu")) as timing:
        timing.add(0.0, 0.0)
        with timing.paused():
            time.sleep(0.3)  # a checkpoint write
        interval = timing.flush_interval()
    assert interval["steps"] == 1 and interval["wall_s"] < 0.1


def test_summary_has_median_p10_p90_over_intervals_and_says_there_is_no_gpu():
    with StepTiming(torch.device("cpu")) as timing:
        for wall in [0.9, 0.1, 0.2, 0.3, 0.4]:  # the first interval is warm-up, left out
            timing.add(0.0, 0.0)
            timing.start = time.perf_counter() - wall
            timing.flush_interval()
    summary = timing.summary(batch_size=8)
    assert summary["step_time_ms_median"] == pytest.approx(250, abs=5)
    assert 100 <= summary["step_time_ms_p10"] < summary["step_time_ms_median"]
    assert summary["step_time_ms_median"] < summary["step_time_ms_p90"] <= 400
    assert summary["gpu_util_mean_pct"] is None and summary["gpu_nvml"] == "no GPU (CPU run)"
    assert summary["peak_memory_mb"] > 0


def test_host_load_tells_the_runs_own_cpu_from_other_processes():
    """A process that is not this run's (here a grandchild: not counted as a loader worker)
    burning a core while the run trains is counted as other processes' load, and marks the run
    as measured on a shared machine."""
    import os
    import signal
    import subprocess
    import sys

    from harness.hardware import HostLoad

    other = subprocess.Popen(
        ["sh", "-c", f"{sys.executable} -c 'while True: pass' & wait"], start_new_session=True
    )
    try:
        time.sleep(0.5)
        burner = int(Path(f"/proc/{other.pid}/task/{other.pid}/children").read_text().split()[0])
        load, mine, theirs = HostLoad(), sum(os.times()[:2]), cpu_seconds(burner)
        began = time.perf_counter()
        load.start()
        while time.perf_counter() < began + 1.5:  # this run: as much of a core as it gets
            pass
        load.stop()
        wall = time.perf_counter() - began
        mine, theirs = sum(os.times()[:2]) - mine, cpu_seconds(burner) - theirs
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
    got, cpus = load.result(), os.cpu_count()
    assert got["cpu_share_own"] == pytest.approx(mine / (wall * cpus), abs=0.05)
    assert got["cpu_share_others"] >= theirs / (wall * cpus) - 0.05 and got["contended"] is True
    assert got["load_avg_1m"] is not None and len(got["load_avg_1m"]) == 2


def cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_cpu_peak_is_measured_once_per_machine_and_cached_with_its_date(tmp_path, monkeypatch):
    from harness import costs

    monkeypatch.setenv("CLIPBENCH_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(costs, "_measured_matmul", lambda *a: measured.append(1) or 123e9)
    first = costs.device_peak_flops(torch.device("cpu"))
    monkeypatch.setattr(costs, "_measured_matmul", lambda *a: pytest.fail("measured again"))
    second = costs.device_peak_flops(torch.device("cpu"))
    assert first == second and first[0] == 123e9 and measured == [1]
    assert f"measured {time.strftime('%Y-%m-%d')} (cached in {tmp_path}" in first[1]
    assert costs.machine_key(torch.device("cpu")) in first[1]


def test_chance_levels_of_retrieval_are_exact():
    from harness.evaluator import retrieval_chance

    # image 0 has captions 0 and 1, image 1 has caption 2: a random caption ranking puts one
    # of image 0's two captions first with probability 2/3, image 1's with 1/3
    chance = retrieval_chance(torch.tensor([0, 0, 1]), 2)
    assert chance["chance_i2t_r1"] == pytest.approx(50.0)
    assert chance["chance_t2i_r1"] == pytest.approx(50.0)
    assert chance["chance_i2t_r5"] == chance["chance_t2i_r5"] == 100.0
    five = retrieval_chance(torch.arange(1000).repeat_interleave(5), 1000)  # the built-in test set
    assert five["chance_mean_r1"] == pytest.approx(0.1)
    assert five["chance_i2t_r5"] == pytest.approx(
        100 * (1 - np.prod([(4995 - j) / (5000 - j) for j in range(5)]))
    )
