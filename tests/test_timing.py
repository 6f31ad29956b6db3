"""The trainer's own step timing: checkpoint writes left out, spread and NVML in the summary."""

import time

import pytest
import torch

from harness.trainer import _Timing


def test_time_inside_paused_is_left_out_of_the_interval():
    with _Timing(torch.device("cpu")) as timing:
        timing.add(0.0, 0.0)
        with timing.paused():
            time.sleep(0.3)  # a checkpoint write
        interval = timing.flush_interval()
    assert interval["steps"] == 1 and interval["wall_s"] < 0.1


def test_summary_has_median_p10_p90_over_intervals_and_says_there_is_no_gpu():
    with _Timing(torch.device("cpu")) as timing:
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
