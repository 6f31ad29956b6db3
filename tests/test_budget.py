"""The wall-clock budget: the cosine follows the agreed fraction of time used, not the step cap."""

import itertools
import json
import math
import time

import pytest
import torch

from harness.optim import BudgetClock, build_optimizer
from harness.run import run_config
from harness.specs import TrainConfig
from methods.clip import Clip
from tests.conftest import REPO

WALLCLOCK = dict(budget="wallclock", train_seconds=100.0, batch_size=64, train_samples=64_000)


def test_after_warmup_the_learning_rate_follows_the_time_used():
    config = TrainConfig(**WALLCLOCK, warmup_samples=0, min_lr_ratio=0.1, progress_bar=False)
    clock = BudgetClock(config.train_seconds)
    optimizer, scheduler = build_optimizer(Clip(), torch.nn.Linear(2, 2), config, clock)
    seen = []
    for progress in (0.0, 0.25, 0.5, 1.0):
        clock.progress = progress  # as agreed at a log step; 1 step of a 1,000-step cap
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"] / config.scaled_lr)
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.0, 0.25, 0.5, 1.0)]
    assert seen == pytest.approx(cosine)


def test_warmup_is_still_counted_in_samples():
    config = TrainConfig(**WALLCLOCK, warmup_samples=64 * 4, progress_bar=False)
    clock = BudgetClock(config.train_seconds)
    clock.progress = 0.5
    optimizer, _ = build_optimizer(Clip(), torch.nn.Linear(2, 2), config, clock)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(config.scaled_lr / 4)  # step 0 of 4


def test_a_resumed_clock_agrees_on_every_rank():
    """Restored progress is the checkpoint's seconds over the budget, not a local clock read."""
    clock = BudgetClock(10.0)
    clock.restore(2.5)
    assert clock.progress == 0.25
    assert BudgetClock(0.0).progress == 0.0  # no time budget: the schedule counts steps


@pytest.mark.slow
def test_a_wallclock_run_stops_on_time_with_the_rate_annealed(tiny_data, tmp_path, monkeypatch):
    """On a fake clock (10 ms per reading), so a slow machine cannot end it at its first log."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: 0.01 * next(ticks))
    out = tmp_path / "run"
    run_config(
        [REPO / "configs/smoke.gin"],
        [
            f"DATA='{tiny_data}'", "MODEL='micro-vit'", "TrainConfig.progress_bar=False",
            "EvalConfig.probe_train_samples=100", "TRAIN_SAMPLES=1000000",
            "TrainConfig.budget='wallclock'", "TrainConfig.train_seconds=3.0",
            "TrainConfig.warmup_samples=0", "TrainConfig.log_every_steps=2",
        ],
        out=out,
    )  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    status = json.loads((out / "status.json").read_text())
    assert run["train"]["samples_cap"] == 1_000_000 and "samples_seen" not in run["train"]
    assert status["status"] == "finished" and 0 < status["step"] < run["train"]["total_steps"]
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == sorted(lrs, reverse=True)
    # stepped by the cap, the cosine would still be above 0.99 of the peak after a few seconds
    assert lrs[-1] < 0.5 * run["train"]["scaled_lr"]
