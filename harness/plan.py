"""The plan: what the entry point builds once from gin and every launcher executes.

    SweepPlan -> CellPlan (a grid cell, or the one run) -> StagePlan (one training run)

A StagePlan holds its resolved ``RunSpec``, its run directory and its gin texts (written to
``config.gin`` and ``operative_config.gin``); a shared stage (a siclip teacher) lives under the
sweep's ``shared/``, named by the hash of its config, so every cell that needs the same one
reuses it. Plans are plain data: ``to_json``/``from_json`` carry them to a cell's process,
torchrun's ranks or a SLURM task, which run them without reading gin. ``harness.planner``
builds plans (the only place that parses gin); ``validate`` checks all of one before any compute.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import distributed, errors, faults, models
from harness.data.loader import resolve_manifest
from harness.data.stream import loader_readers, smallest_reader_epoch
from harness.distributed import DistInfo
from harness.errors import ConfigError, UserError
from harness.grid import Grid
from harness.manifest import Manifest
from harness.rundir import RunDir
from harness.specs import DataConfig, RunSpec
from methods import build_method, other_methods


@dataclass(frozen=True)
class StagePlan:
    name: str  # "main" for a one-stage method; superclass: "cls", "lit"; siclip: "teacher"...
    run_dir: Path
    spec: RunSpec
    config_text: str  # every binding in force (config.gin); a rerun must match it
    operative_text: str  # the bindings the run uses (operative_config.gin)
    config_hash: str  # of the run's config and model (run.json)
    shared: bool = False
    inputs: dict[str, str] = field(default_factory=dict)  # gin parameter -> earlier stage


@dataclass(frozen=True)
class CellPlan:
    directory: Path
    stages: tuple[StagePlan, ...]
    name: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # its grid values (a sweep's cell)
    bindings: tuple[str, ...] = ()  # its own bindings on top of the sweep's
    config_hash: str = ""


@dataclass(frozen=True)
class SweepPlan:
    directory: Path
    config_files: tuple[str, ...]
    bindings: tuple[str, ...]  # on top of the files, before each cell's own
    grid: Grid
    cells: tuple[CellPlan, ...]

    def cell(self, name: str) -> CellPlan:
        found = [c for c in self.cells if c.name == name]
        if not found:
            raise ConfigError(f"{self.directory}: no cell {name!r} in its plan")
        return found[0]


# ---------------------------------------------------------------- gin config texts

# How a sweep is laid out and launched (its axes, launcher, report): no single run's result
# depends on it, so adding a seed or a batch size to a grid keeps the cells already run. World
# size, the one launch choice that can change a result, is hashed by the callers.
SWEEP_LAYOUT = frozenset({"Grid"})


def differing_bindings(
    saved: str, current: str, *, ignore: frozenset[str] = frozenset(),
    ignore_params: frozenset[str] = frozenset(),
) -> list[str]:  # fmt: skip
    """The bindings where two gin config texts differ, as '- saved' and '+ current'. Left out:
    the bindings of the ``ignore`` configurables and the sweep layout (as in the config hash)
    and of ``ignore_params`` such as 'superclass.init_from', which hold the directories of
    earlier stages (their own configs are checked where they run, and a sweep may have moved
    since)."""

    def kept(text: str) -> list[str]:
        return [
            binding
            for binding in bindings_of(text, ignore=ignore)
            if not any(binding.split("=", 1)[0].strip().endswith(p) for p in ignore_params)
        ]

    old, new = kept(saved), kept(current)
    old_set, new_set = set(old), set(new)
    return [f"- {x}" for x in old if x not in new_set] + [f"+ {x}" for x in new if x not in old_set]


def bindings_of(text: str, *, ignore: frozenset[str] = frozenset()) -> list[str]:
    """gin's config text as one string per binding (a long value goes on over indented lines),
    without comments, blank lines, the sweep layout and the ``ignore`` configurables."""
    bindings: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and bindings:
            bindings[-1] += "\n" + line
        else:
            bindings.append(line)
    left_out = ignore | SWEEP_LAYOUT
    return [b for b in bindings if _configurable_of(b) not in left_out]


def _configurable_of(line: str) -> str | None:
    """'scope/module.name.param = value' -> 'name'; None for macros, comments and blank lines."""
    selector = line.split("=", 1)[0].strip()
    if "=" not in line or line.startswith("#") or "." not in selector:
        return None
    return selector.rsplit("/", 1)[-1].rsplit(".", 2)[-2]


# ---------------------------------------------------------------- checking, before any compute

# Bindings that cannot change a run's results: a run may be resumed with other values (a fault
# injected into the first attempt, a different checkpoint or logging interval).
NOT_RESULT_PARAMS = frozenset({"Faults.spec", "TrainConfig.checkpoint_every_samples",
                               "TrainConfig.log_every_steps", "TrainConfig.progress_bar"})  # fmt: skip


def validate(cells: list[CellPlan], dist: DistInfo, *, resume: bool = True,
             gpus_per_cell: int = 0) -> dict[str, Manifest]:  # fmt: skip
    """Every check that needs no training, for every stage of every cell, with the batch,
    model and data it will train on; the first problem is one clear error naming the cell and
    stage. ``gpus_per_cell``: the local ranks a launcher gives a cell, each its own GPU.
    Returns the datasets by manifest (the built-in one is built here)."""
    manifests: dict[str | None, Manifest] = {}
    for cell in cells:
        inputs = frozenset(p for stage in cell.stages for p in stage.inputs)
        for stage in cell.stages:
            try:
                _check_stage(stage, dist, manifests, gpus_per_cell)
                _check_same_config(stage, resume=resume, ignore_params=inputs)
            except UserError as e:
                where = [f"{cell_label(cell.values)}: " if cell.values else ""]
                where += [f"stage {stage.name!r}: " if len(cell.stages) > 1 else ""]
                raise ConfigError("".join(where) + errors.message(e)) from None
    return manifests


def validate_sweep(plan: SweepPlan) -> None:
    """``validate`` for a sweep's cells, as they will run: with the grid's world size."""
    world = DistInfo(
        rank=0, world_size=plan.grid.world_size, local_rank=0, device=torch.device("cpu")
    )
    validate(list(plan.cells), world, gpus_per_cell=plan.grid.gpus_per_cell)


def cell_label(values: dict[str, Any]) -> str:
    return "grid cell (" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"


def _check_stage(stage: StagePlan, dist: DistInfo, manifests: dict, gpus_per_cell: int) -> None:
    spec = stage.spec
    faults.parse_spec(spec.faults)
    if not stage.inputs:  # its own checks; a stage that reads earlier ones' folders (not there
        build_method(spec.method)  # yet) is checked as it starts, the cell's first stage now
    models.model_config(spec.run.model)
    if spec.train.batch_size % dist.world_size:
        raise ConfigError(
            f"BATCH_SIZE={spec.train.batch_size} is not divisible by the number of processes "
            f"({dist.world_size})"
        )
    visible = torch.cuda.device_count()
    if gpus_per_cell > 1 and distributed.uses_cuda(spec.run.device) and visible < gpus_per_cell:
        raise ConfigError(
            f"Grid.nproc_per_node={gpus_per_cell} needs one GPU per process and {visible} "
            f"{'is' if visible == 1 else 'are'} visible; lower it or set RunConfig.device='cpu'"
        )
    if spec.data.manifest not in manifests:
        manifests[spec.data.manifest] = manifest_once(spec.data, dist)
    check_data_fits(spec, manifests[spec.data.manifest], dist.world_size)


def manifest_once(data: DataConfig, dist: DistInfo, *, checksums: bool | None = None) -> Manifest:
    """The main process builds the built-in dataset if needed; the others wait, then read it."""
    if dist.is_main:
        manifest = resolve_manifest(data, checksums=checksums)
    distributed.barrier()
    if not dist.is_main:
        manifest = resolve_manifest(data, checksums=checksums)
    return manifest


def check_data_fits(spec: RunSpec, manifest: Manifest, world_size: int) -> None:
    """The batch fits the training split, each reader can fill a batch of distinct images, and
    the evaluation split exists."""
    train_size = manifest.split("train").num_samples
    if spec.train.batch_size > train_size:
        raise ConfigError(
            f"BATCH_SIZE={spec.train.batch_size} is larger than the training split "
            f"({train_size} samples in {manifest.root})"
        )
    per_rank = spec.train.batch_size // world_size
    readers = world_size * loader_readers(spec.data.num_workers)
    fewest = smallest_reader_epoch(manifest, readers)
    if per_rank > fewest:
        raise ConfigError(
            f"BATCH_SIZE={spec.train.batch_size} gives each of {world_size} process(es) "
            f"batches of {per_rank} distinct images, but with {readers} loader reader(s) "
            f"(DataConfig.num_workers={spec.data.num_workers} per process) one reader gets as "
            f"few as {fewest} training samples an epoch ({manifest.root}); lower the batch or "
            "the number of workers"
        )
    manifest.split(spec.eval.split)


def _check_same_config(stage: StagePlan, *, resume: bool, ignore_params: frozenset[str]) -> None:
    """A finished or resumable run directory belongs to the config it was started with: reporting
    its results for another config, or continuing its checkpoint under one, would be wrong."""
    run = RunDir(stage.run_dir)
    if not run.config.exists() or not (run.finished or (resume and run.checkpoint.exists())):
        return
    diff = differing_bindings(
        run.config.read_text(), stage.config_text,
        ignore=other_methods(stage.spec.run.method),  # as the shared-stage hash
        ignore_params=ignore_params | NOT_RESULT_PARAMS,
    )  # fmt: skip
    if diff:
        shown = "\n  ".join(diff[:8]) + ("\n  ..." if len(diff) > 8 else "")
        raise ConfigError(
            f"{run.path} holds a run of another config; {run.config} differs from this one in:\n"
            f"  {shown}\nchoose another --out, or run it with the config it was started with"
        )


# ---------------------------------------------------------------- to and from JSON


def sweep_to_json(plan: SweepPlan) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(plan), default=str))  # paths as strings


def sweep_from_json(raw: dict[str, Any]) -> SweepPlan:
    cells = tuple(_cell_from_json(c) for c in raw["cells"])
    return SweepPlan(
        directory=Path(raw["directory"]), config_files=tuple(raw["config_files"]),
        bindings=tuple(raw["bindings"]), grid=Grid(**raw["grid"]), cells=cells,
    )  # fmt: skip


def _cell_from_json(raw: dict[str, Any]) -> CellPlan:
    stages = tuple(
        StagePlan(**{**s, "run_dir": Path(s["run_dir"]), "spec": RunSpec.from_json(s["spec"])})
        for s in raw["stages"]
    )
    return CellPlan(**{**raw, "directory": Path(raw["directory"]), "stages": stages,
                       "bindings": tuple(raw["bindings"])})  # fmt: skip
