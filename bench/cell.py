"""Build one benchmark cell (method x batch size x model) exactly as a run builds it.

The config goes through the planner (``configs/base.gin`` plus bindings), the same validation,
the same seeded model construction and the same ``Trainer`` as ``harness.execute``;
only the budget is set in steps and periodic checkpoints are off, so what is timed is the
training step a real run executes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness import distributed, models
from harness.execute import Built, build, build_trainer
from harness.plan import validate
from harness.planner import plan_stage
from harness.rundir import RunDir
from harness.specs import RunSpec
from harness.trainer import Trainer
from methods import method_class

BASE_CONFIG = "configs/base.gin"
# a budget in steps, and no checkpoint inside the timed steps (fit still saves one at its end)
BENCH_BINDINGS = (
    "TrainConfig.budget = 'steps'",
    "TrainConfig.checkpoint_every_samples = 0",
)


@dataclass
class Cell:
    built: Built
    trainer: Trainer

    @property
    def spec(self) -> RunSpec:
        return self.built.spec

    @property
    def device(self) -> torch.device:
        return self.built.dist.device

    @property
    def per_rank_batch(self) -> int:
        return self.spec.train.batch_size // self.built.dist.world_size


def cell_bindings(
    method: str,
    batch_size: int,
    *,
    model: str,
    steps: int,
    workdir: Path,
    data: str | None = None,
    extra: list[str] = (),
    variant: str | None = None,
) -> list[str]:
    """Every gin binding of a cell: macros, the bench's budget, and what the method needs to run
    on its own (``Method.example_bindings``, e.g. siclip's teacher; ``variant``: one of the
    method's ``example_variants``, default its first)."""
    model_cfg = models.model_config(model)
    cls = method_class(method)
    bindings = [
        f"METHOD = '{method}'",
        f"BATCH_SIZE = {batch_size}",
        f"MODEL = '{model}'",
        f"TrainConfig.train_steps = {steps}",
        *BENCH_BINDINGS,
        *cls.example_bindings(Path(workdir), model_cfg, variant or cls.example_variants[0]),
    ]
    if data is not None:
        bindings.append(f"DATA = '{data}'")
    return [*bindings, *extra]


def check_cell(bindings: list[str], *, run_dir: Path, config_file: str = BASE_CONFIG) -> RunSpec:
    """Plan and validate the config as one run, as a run is validated (one clear error for a
    bad binding, model or batch); returns its spec."""
    cell = plan_stage([config_file], bindings, run_dir=run_dir)
    validate([cell], distributed.init(cell.stages[0].spec.run.device))
    return cell.stages[0].spec


def build_cell(bindings: list[str], *, run_dir: Path, config_file: str = BASE_CONFIG) -> Cell:
    """Plan, validate and build as ``harness.execute.run_stage`` does; no training yet."""
    built = build(check_cell(bindings, run_dir=run_dir, config_file=config_file))
    return Cell(built, build_trainer(built, RunDir(run_dir)))
