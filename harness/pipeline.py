"""A method's stages, run in order, each a full run directory.

Most methods have one stage and their run directory is the output folder itself. A method with
several (superclass: classification then LiT; siclip: teacher then student) gets one
sub-folder per stage, and ``stages.json`` lists them; the last stage is the method's result.
A stage's ``inputs`` are bound, as gin parameters, to the run directories of earlier stages.
A ``shared`` stage lives under ``shared_root`` named by its config hash, so every run that
needs an identical one (a teacher, say) reuses it instead of training it again; a file lock
keeps two concurrent runs from training the same shared stage twice (the second waits).
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness import config, distributed, models, rundir
from harness.errors import UserError
from harness.manifest import writable_dir, write_json_atomic
from harness.train import run_one
from methods import RunInfo, Stage, build_method, other_methods


@dataclass(frozen=True)
class StageRun:
    stage: Stage
    bindings: list[str]  # the run's bindings plus this stage's
    run_dir: Path


def plan_stages(config_files: list[str | Path], bindings: list[str]) -> list[Stage]:
    config.parse(config_files, bindings)
    return stages_of(config.resolve())


def stages_of(spec: config.RunSpec) -> list[Stage]:
    """The stages of the method ``spec`` trains (the parsed config builds the method)."""
    method = build_method(spec.run.method)
    info = RunInfo(
        batch_size=spec.train.batch_size,
        train_samples=spec.train.train_samples,
        model=spec.run.model,
    )
    return method.stages(info)


def default_out(config_files: list[str | Path], bindings: list[str]) -> Path:
    config.parse(config_files, bindings)
    spec = config.resolve()
    digest = config.config_hash(models.model_config(spec.run.model))
    return Path("runs") / f"{spec.run.method}-b{spec.train.batch_size}-s{spec.train.seed}-{digest}"


def plan_runs(
    config_files: list[str | Path],
    bindings: list[str],
    *,
    out: Path,
    shared_root: Path | None = None,
) -> list[StageRun]:
    """Every stage with its bindings and run directory, without running anything."""
    stages = plan_stages(config_files, bindings)
    if (
        len(stages) == 1
        and not stages[0].bindings
        and not stages[0].shared
        and not stages[0].inputs
    ):
        return [StageRun(stages[0], list(bindings), out)]
    shared_root = shared_root or out.parent / "shared"
    runs: list[StageRun] = []
    done = {}
    for stage in stages:
        extra = list(stage.bindings)
        for param, source in stage.inputs.items():
            if source not in done:
                raise config.ConfigError(
                    f"stage {stage.name!r} needs stage {source!r}, which comes later"
                )
            extra.append(f"{param} = '{Path(done[source]).resolve()}'")  # valid from any cwd
        stage_bindings = [*bindings, *extra]
        config.parse(config_files, stage_bindings)
        check_stage_macros(stage, config.resolve())
        if stage.shared:
            run_dir = shared_root / f"{stage.name}-{shared_stage_hash()}"
        else:
            run_dir = out / stage.name
        done[stage.name] = run_dir
        runs.append(StageRun(stage, stage_bindings, run_dir))
    return runs


# The macros a stage may set, and the config field base.gin binds each one to. A direct binding
# of that field (``TrainConfig.train_samples = ...``) outranks the macro, so the stage's value
# would be silently lost; check_stage_macros refuses that.
STAGE_MACROS = {
    "METHOD": ("RunConfig.method", lambda spec: spec.run.method),
    "MODEL": ("RunConfig.model", lambda spec: spec.run.model),
    "BATCH_SIZE": ("TrainConfig.batch_size", lambda spec: spec.train.batch_size),
    "TRAIN_SAMPLES": ("TrainConfig.train_samples", lambda spec: spec.train.train_samples),
}


def check_stage_macros(stage: Stage, spec: config.RunSpec) -> None:
    """Every macro the stage sets must reach the resolved config."""
    for binding in stage.bindings:
        name, _, value = (part.strip() for part in binding.partition("="))
        if name not in STAGE_MACROS:
            continue
        target, read = STAGE_MACROS[name]
        wanted, got = ast.literal_eval(value), read(spec)
        if got != wanted:
            raise config.ConfigError(
                f"stage {stage.name!r} sets {name} = {wanted!r}, but {target} resolves to "
                f"{got!r}: a binding of {target} itself overrides the macro; bind {name} instead"
            )


def shared_stage_hash() -> str:
    """Hash of the parsed config, without the bindings of methods this stage does not train.

    A shared stage (a teacher) is reused by every run whose resolved stage config is the same;
    the hyperparameters of the method that *consumes* it must not force a retrain.
    """
    trained = config.resolve().run.method
    world = {"world_size": distributed.env_world_size()}  # the grid's layout is not hashed
    return config.config_hash(world, ignore=other_methods(trained))


def run_pipeline(
    config_files: list[str | Path],
    bindings: list[str],
    *,
    out: Path | None,
    resume: bool = False,
    shared_root: Path | None = None,
    until: str | None = None,
) -> Path:
    """Run the configured method's stages (up to ``until``); returns the last run directory.

    The main process holds ``out``'s lock throughout: a second process (a sweep rerun while
    an orphaned cell still trains, a second ``harness.run``) is refused by name."""
    out = out or default_out(config_files, bindings)
    runs = plan_runs(config_files, bindings, out=out, shared_root=shared_root)
    if until is not None and until not in [r.stage.name for r in runs]:
        raise config.ConfigError(
            f"no stage {until!r}; this method's stages: {[r.stage.name for r in runs]}"
        )
    main = distributed.env_rank() == 0
    new = main and not out.exists()
    if main:
        writable_dir(out)
    try:
        return _run_stages(runs, config_files, out=out, resume=resume, until=until, main=main)
    except UserError:
        if new and {p.name for p in out.iterdir()} <= {rundir.LOCK}:
            shutil.rmtree(out)  # refused before anything was written: leave nothing behind
        raise


def _run_stages(
    runs: list[StageRun], config_files: list[str | Path], *, out: Path, resume: bool,
    until: str | None, main: bool,
) -> Path:  # fmt: skip
    with rundir.held(out) if main else contextlib.nullcontext():
        if len(runs) > 1 and main:
            write_json_atomic(
                out / "stages.json", {"stages": [_stage_record(r, out) for r in runs]}
            )
        for run in runs:
            config.parse(config_files, run.bindings)
            # a shared stage is a cache: wait for another run training it, then reuse it
            guard = rundir.held(run.run_dir, wait=True) if run.stage.shared and main else None
            with guard or contextlib.nullcontext():
                run_one(run.run_dir, resume=resume or run.stage.shared)
            if run.stage.name == until:
                return run.run_dir
    return runs[-1].run_dir


def _stage_record(run: StageRun, out: Path) -> dict:
    return {
        # relative to this directory, so a moved or copied sweep stays readable
        "name": run.stage.name,
        "run_dir": os.path.relpath(run.run_dir, out),
        "shared": run.stage.shared,
        # gin parameter -> the stage it names: lets a moved run be re-evaluated
        "inputs": dict(run.stage.inputs),
    }
