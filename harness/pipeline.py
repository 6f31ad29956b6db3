"""A method's stages, run in order, each a full run directory.

Most methods have one stage and their run directory is the output folder itself. A method with
several (superclass: classification then LiT; siclip: teacher then student) gets one
sub-folder per stage, and ``stages.json`` lists them; the last stage is the method's result.
A stage's ``inputs`` are bound, as gin parameters, to the run directories of earlier stages.
A ``shared`` stage lives under ``shared_root`` named by its config hash, so every run that
needs an identical one (a teacher, say) reuses it instead of training it again.
"""

from __future__ import annotations

from pathlib import Path

from harness import config, models, rundir
from harness.manifest import write_json_atomic
from harness.train import run_one
from methods import RunInfo, build_method, registered_names


def plan_stages(config_files: list[str | Path], bindings: list[str]):
    config.parse(config_files, bindings)
    spec = config.resolve()
    method = build_method(spec.run.method)
    info = RunInfo(
        batch_size=spec.train.batch_size,
        train_samples=spec.train.train_samples,
        model=spec.run.model,
    )
    return spec, method.stages(info)


def stage_bindings(stage, done: dict[str, Path]) -> list[str]:
    extra = list(stage.bindings)
    for param, source in stage.inputs.items():
        if source not in done:
            raise config.ConfigError(
                f"stage {stage.name!r} needs stage {source!r}, which comes later"
            )
        extra.append(f"{param} = '{Path(done[source]).resolve()}'")  # valid from any cwd
    return extra


def shared_stage_hash() -> str:
    """Hash of the parsed config, without the bindings of methods this stage does not train.

    A shared stage (a teacher) is reused by every run whose resolved stage config is the same;
    the hyperparameters of the method that *consumes* it must not force a retrain.
    """
    trained = config.resolve().run.method
    return config.config_hash(ignore=frozenset(registered_names()) - {trained})


def run_pipeline(
    config_files: list[str | Path],
    bindings: list[str],
    *,
    out: Path | None,
    resume: bool = False,
    shared_root: Path | None = None,
) -> Path:
    """Run every stage of the configured method; returns the final stage's run directory."""
    spec, stages = plan_stages(config_files, bindings)
    if len(stages) == 1 and not stages[0].bindings and not stages[0].shared:
        config.parse(config_files, bindings)
        return run_one(out, resume=resume)
    if out is None:
        out = Path("runs") / f"{spec.run.method}-b{spec.train.batch_size}-s{spec.train.seed}-" \
            f"{config.config_hash(models.model_config(spec.run.model))}"  # fmt: skip
    shared_root = shared_root or out.parent / "shared"
    done: dict[str, Path] = {}
    for stage in stages:
        extra = stage_bindings(stage, done)
        config.parse(config_files, [*bindings, *extra])
        if stage.shared:
            stage_dir = shared_root / f"{stage.name}-{shared_stage_hash()}"
        else:
            stage_dir = out / stage.name
        done[stage.name] = run_one(stage_dir, resume=resume or rundir.is_finished(stage_dir))
    write_json_atomic(
        out / "stages.json",
        {
            "stages": [
                {"name": s.name, "run_dir": str(done[s.name]), "shared": s.shared} for s in stages
            ]
        },
    )
    return done[stages[-1].name]
