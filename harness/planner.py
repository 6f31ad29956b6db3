"""Building the plan from gin: the entry point's one parse phase (see ``harness.plan``).

Every cell and stage is parsed and resolved here, its method built once under gin (so that its
hyperparameters are in the operative config and a bad one is refused now), and its gin texts,
hashes and run directory are fixed; what leaves this module is plain data.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

from harness import config, models
from harness.errors import ConfigError, UserError
from harness.grid import Grid, cell_name, pin_axes
from harness.plan import CellPlan, StagePlan, SweepPlan, cell_label
from harness.specs import RunSpec
from methods import RunInfo, Stage, other_methods


def plan_run(
    config_files: list[str | Path], bindings: list[str], *, out: Path | None = None,
    shared_root: Path | None = None, world_size: int = 1,
) -> CellPlan:  # fmt: skip
    """One run of the configured method, all of its stages, into ``out`` (default: a folder
    of ``runs/`` named by method, batch, seed and config hash)."""
    config.parse(config_files, bindings)
    spec = config.resolve()
    digest = config.config_hash(models.model_config(spec.run.model))
    out = Path(
        out or f"runs/{spec.run.method}-b{spec.train.batch_size}-s{spec.train.seed}-{digest}"
    )
    root = shared_root or out.parent / "shared"
    return _cell(config_files, bindings, spec, directory=out, shared_root=root, world=world_size)


def plan_stage(config_files: list[str | Path], bindings: list[str], *, run_dir: Path) -> CellPlan:
    """The config as one training run, whatever stages its method would plan (bench/ times
    exactly the run a config describes)."""
    config.parse(config_files, bindings)
    spec = config.resolve()
    config.configured_method(spec.run.method)  # its bindings become operative
    return CellPlan(Path(run_dir), (_stage(Stage("main"), Path(run_dir), spec),))


def plan_sweep(
    config_file: str | Path, bindings: list[str], grid: Grid, *, out: Path | None
) -> SweepPlan:
    """Every cell of the configured grid, each with every stage it runs."""
    # absolute: cells run with the repository as their working directory, wherever this started
    directory = Path(out or Path("sweeps") / Path(config_file).stem).resolve()
    grid, bindings = pin_axes(grid, bindings)
    cells = []
    for values, own in grid.cells():
        try:
            config.parse([config_file], [*bindings, *own])
            spec = config.resolve()
            model = models.model_config(spec.run.model)
            digest = config.config_hash(model, {"world_size": grid.world_size})
            name = cell_name(values, digest)
            cell = _cell([config_file], [*bindings, *own], spec, directory=directory / "cells" / name,
                         shared_root=directory / "shared", world=grid.world_size)  # fmt: skip
        except UserError as e:
            raise ConfigError(f"{cell_label(values)}: {e}") from None
        cells.append(
            replace(cell, name=name, values=values, bindings=tuple(own), config_hash=digest)
        )
    return SweepPlan(directory, (str(config_file),), tuple(bindings), grid, tuple(cells))


def _cell(config_files, bindings, spec: RunSpec, *, directory: Path, shared_root: Path,
          world: int) -> CellPlan:  # fmt: skip
    """The cell's stages: each with the run's bindings plus its own, its inputs bound to the
    directories of the earlier stages it needs."""
    method = config.configured_method(spec.run.method)
    stages = method.stages(RunInfo(spec.train.batch_size, spec.train.train_samples, spec.run.model))
    only = stages[0]
    if len(stages) == 1 and not (only.bindings or only.inputs or only.shared):
        return CellPlan(directory, (_stage(only, directory, spec),))
    planned: dict[str, StagePlan] = {}
    for stage in stages:
        extra = list(stage.bindings)
        for param, source in stage.inputs.items():
            if source not in planned:
                raise ConfigError(f"stage {stage.name!r} needs stage {source!r}, which comes later")
            extra.append(f"{param} = '{planned[source].run_dir.resolve()}'")  # valid from any cwd
        try:
            config.parse(config_files, [*bindings, *extra])
            stage_spec = config.resolve()
            _record_operative(stage_spec.run.method, inputs=bool(stage.inputs))
        except UserError as e:
            raise ConfigError(f"stage {stage.name!r}: {e}") from None
        check_stage_macros(stage, stage_spec)  # its message names the stage
        run_dir = directory / stage.name
        if stage.shared:
            run_dir = shared_root / f"{stage.name}-{shared_hash(stage_spec, world_size=world)}"
        planned[stage.name] = _stage(stage, run_dir, stage_spec)
    return CellPlan(directory, tuple(planned.values()))


def _record_operative(method: str, *, inputs: bool) -> None:
    """Build the stage's method under gin, so that its bindings are in the operative config
    (gin records them before the method's own checks run). A stage with inputs names the
    folders of earlier stages, which do not exist yet: ``plan.validate`` checks it without."""
    try:
        config.configured_method(method)
    except UserError:
        if not inputs:
            raise


def _stage(stage: Stage, run_dir: Path, spec: RunSpec) -> StagePlan:
    """The stage as gin has it parsed now."""
    return StagePlan(
        name=stage.name, run_dir=run_dir, spec=spec, config_text=config.full_config(),
        operative_text=config.operative_config(),
        config_hash=config.config_hash(models.model_config(spec.run.model)),
        shared=stage.shared, inputs=dict(stage.inputs),
    )  # fmt: skip


def shared_hash(spec: RunSpec, *, world_size: int) -> str:
    """A shared stage (a teacher) is reused by every run whose resolved stage config is the same:
    the hyperparameters of the method that *consumes* it must not force a retrain."""
    return config.config_hash({"world_size": world_size}, ignore=other_methods(spec.run.method))


# The macros a stage may set, and the field base.gin binds each to. A direct binding of that
# field (``TrainConfig.train_samples = ...``) outranks the macro, so the stage's value would be
# lost without a word; check_stage_macros refuses that.
STAGE_MACROS = {
    "METHOD": ("RunConfig.method", lambda spec: spec.run.method),
    "MODEL": ("RunConfig.model", lambda spec: spec.run.model),
    "BATCH_SIZE": ("TrainConfig.batch_size", lambda spec: spec.train.batch_size),
    "TRAIN_SAMPLES": ("TrainConfig.train_samples", lambda spec: spec.train.train_samples),
}


def check_stage_macros(stage: Stage, spec: RunSpec) -> None:
    """Every macro the stage sets must reach the resolved config."""
    for binding in stage.bindings:
        name, _, value = (part.strip() for part in binding.partition("="))
        if name not in STAGE_MACROS:
            continue
        target, read = STAGE_MACROS[name]
        wanted, got = ast.literal_eval(value), read(spec)
        if got != wanted:
            raise ConfigError(
                f"stage {stage.name!r} sets {name} = {wanted!r}, but {target} resolves to "
                f"{got!r}: a binding of {target} itself overrides the macro; bind {name} instead"
            )
