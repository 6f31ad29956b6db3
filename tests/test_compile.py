"""``TrainConfig.compile``: every method trains compiled as it does eagerly, with no recompiles.

A recompile per step (Python state such as a step counter traced into the graph) would make the
option far slower than eager; methods keep such code out with ``torch.compiler.disable``.

The losses are compared in fp32 on every device. Under bf16 autocast (the default on CUDA)
compiled kernels fuse and round differently from eager ones, so there the losses only agree to
bf16's precision; that case runs where CUDA is, with a tolerance to match.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

import methods
from bench.cell import build_cell, cell_bindings

STEPS = 6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is CUDA's default")
PRECISIONS = ["fp32", pytest.param("bf16", marks=CUDA)]
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def train(name: str, compiled: bool, precision: str, data, workdir) -> tuple[list[float], int, int]:
    """Logged losses, and the number of compiled graphs after step 1 and after the last step."""
    torch._dynamo.reset()
    counters.clear()
    bindings = cell_bindings(
        name, 16, model="micro-vit", steps=STEPS, workdir=workdir, data=str(data),
        extra=["DataConfig.num_workers = 0", f"TrainConfig.compile = {compiled}",
               "TrainConfig.log_every_steps = 2", "TrainConfig.progress_bar = False",
               f"TrainConfig.precision = '{precision}'"],
    )  # fmt: skip
    run_dir = workdir / f"run-{name}-{compiled}-{precision}"
    cell = build_cell(bindings, run_dir=run_dir)
    assert isinstance(cell.trainer.train_step_fn, torch._dynamo.OptimizedModule) == compiled
    graphs = []
    cell.trainer.on_step = lambda step: graphs.append(counters["stats"]["unique_graphs"])
    try:
        cell.trainer.fit()
    finally:
        cell.trainer.close()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    return losses, graphs[0], graphs[-1]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", methods.registered_names())
def test_compiled_training_matches_eager_without_recompiles(name, precision, tiny_data, tmp_path):
    eager, _, _ = train(name, False, precision, tiny_data, tmp_path)
    compiled, after_first, after_last = train(name, True, precision, tiny_data, tmp_path)
    tolerance = RELATIVE_TOLERANCE[precision]
    assert len(eager) == STEPS // 2 and compiled == pytest.approx(eager, rel=tolerance)
    assert after_first > 0 and after_last == after_first, "a step after the first recompiled"
