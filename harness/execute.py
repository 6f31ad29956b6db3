"""Executing a plan: a cell's stages in order, each one run end to end (build, train, evaluate,
record). Takes ``harness.plan`` objects; reads no gin.

Most methods have one stage, whose run directory is the cell's folder itself. A method with
several (superclass: classification then LiT; siclip: teacher then student) gets one folder per
stage and ``stages.json``; a shared stage (a teacher) is waited for when another process trains
it, then reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from harness import distributed, errors, faults, host_memory, models, stopping
from harness.costs import count_costs
from harness.distributed import DistInfo
from harness.errors import ConfigError, NonFiniteEmbeddings, UserError
from harness.evaluator import evaluate
from harness.files import writable_dir, write_json_atomic, write_text_atomic
from harness.manifest import Manifest
from harness.plan import CellPlan, StagePlan, manifest_once
from harness.rundir import FINISHED, RunDir, device_name, git_commit, package_versions
from harness.specs import RunSpec
from harness.step import autocast, set_deterministic
from harness.trainer import Diverged, Trainer
from methods import Method, build_method

EXIT_DIVERGED = 3
EVALUATION_FAILED = "evaluation:"  # status reason prefix: trained, but not evaluated


def run_cell(cell: CellPlan, *, resume: bool = False, until: str | None = None) -> Path:
    """Run the cell's stages (up to ``until``); returns the last run directory.

    The main process holds the cell's lock throughout: a second process (a sweep rerun while
    an orphaned cell still trains, a second ``harness.run``) is refused by name. A run refused
    before anything was written leaves no folder behind."""
    names = [s.name for s in cell.stages]
    if until is not None and until not in names:
        raise ConfigError(f"no stage {until!r}; this method's stages: {names}")
    main = distributed.env_rank() == 0
    new = main and not cell.directory.exists()
    if main:
        writable_dir(cell.directory)
    try:
        return _run_stages(cell, resume=resume, until=until, main=main)
    except UserError:
        if new and {p.name for p in cell.directory.iterdir()} <= {".lock"}:
            shutil.rmtree(cell.directory)
        raise


def _run_stages(cell: CellPlan, *, resume: bool, until: str | None, main: bool) -> Path:
    with RunDir(cell.directory).held() if main else contextlib.nullcontext():
        if len(cell.stages) > 1 and main:
            stages = [_stage_record(s, cell.directory) for s in cell.stages]
            write_json_atomic(RunDir(cell.directory).stages_file, {"stages": stages})
        for stage in cell.stages:
            # a shared stage is a cache: wait for another run training it, then reuse it
            waiting = RunDir(stage.run_dir).held(wait=True) if stage.shared and main else None
            with waiting or contextlib.nullcontext():
                run_stage(stage, resume=resume or stage.shared)
            if stage.name == until:
                return stage.run_dir
    return cell.stages[-1].run_dir


def _stage_record(stage: StagePlan, cell_dir: Path) -> dict[str, Any]:
    return {
        "name": stage.name,
        # relative to the cell, so a moved or copied sweep stays readable
        "run_dir": os.path.relpath(stage.run_dir, cell_dir),
        "shared": stage.shared,
        # gin parameter -> the stage it names: lets a moved run be re-evaluated
        "inputs": dict(stage.inputs),
    }


# ---------------------------------------------------------------- one stage


@dataclass
class Built:
    spec: RunSpec
    method: Method
    model_cfg: dict[str, Any]
    manifest: Manifest
    dist: DistInfo


def build(spec: RunSpec) -> Built:
    """Join the process group and build what the run needs but the model (also for bench/).
    The plan was validated: the dataset's checksums were checked then."""
    dist = distributed.init(spec.run.device)
    manifest = manifest_once(spec.data, dist, checksums=False)
    return Built(
        spec, build_method(spec.method), models.model_config(spec.run.model), manifest, dist
    )


def build_trainer(b: Built, run: RunDir) -> Trainer:
    """The seeded model and its trainer (also what bench/ times)."""
    if b.dist.device.type == "cpu":
        host_memory.keep_freed_memory()  # large per-step tensors are reused, not re-faulted
    if b.spec.train.deterministic:
        set_deterministic()
    torch.manual_seed(b.spec.train.seed)
    model = b.method.build_model(b.model_cfg)
    return Trainer(
        method=b.method, model=model, config=b.spec.train, data_config=b.spec.data,
        manifest=b.manifest, run=run, dist=b.dist, image_size=models.image_size(b.model_cfg),
        context_length=models.context_length(b.model_cfg),
    )  # fmt: skip


def run_stage(stage: StagePlan, *, resume: bool = False) -> Path:
    """Train and evaluate one stage into its run directory (a finished one is reported)."""
    run = RunDir(stage.run_dir)
    faults.activate(stage.spec.faults)
    b = build(stage.spec)
    if run.finished:
        print(f"{run.path}: already finished; results in {run.eval}")
        return run.path
    resuming = _prepare(run, resume=resume)
    left = run.left_running() if b.dist.is_main else None  # its lock is ours: its writer is gone
    if left:
        then = "resuming from its checkpoint" if resuming else "starting it again"
        print(f"note: {left}; {then}", file=sys.stderr)
    trainer = build_trainer(b, run)
    if b.dist.is_main:
        _write_provenance(run, stage, b)
    if resuming:
        trainer.resume()
    try:
        _train_and_evaluate(b, trainer, run)
    finally:
        trainer.close()
    return run.path


def _prepare(run: RunDir, *, resume: bool) -> bool:
    """True if training should resume from the run's checkpoint."""
    has_checkpoint = run.checkpoint.exists()
    if has_checkpoint and not resume:
        raise ConfigError(
            f"{run.path} already holds a checkpoint; pass --resume to continue it, "
            f"or choose another --out"
        )
    writable_dir(run.path)
    return has_checkpoint and resume


def _write_provenance(run: RunDir, stage: StagePlan, b: Built) -> None:
    write_text_atomic(run.operative_config, stage.operative_text)
    write_text_atomic(run.config, stage.config_text)
    record = {
        "method": b.method.name, "method_decisions": list(b.method.decisions),
        "method_info": b.method.info(), "model": b.spec.run.model, "model_config": b.model_cfg,
        "data": {"manifest": str(b.manifest.root.resolve() / "manifest.json"),
                 "name": b.manifest.name},
        "train": b.spec.train.record(), "data_config": b.spec.to_json()["data"],
        "eval_config": b.spec.to_json()["eval"], "world_size": b.dist.world_size,
        "device": device_name(b.dist.device), "git_commit": git_commit(),
        "packages": package_versions(), "config_hash": stage.config_hash,
    }  # fmt: skip
    write_json_atomic(run.record, record)


def _train_and_evaluate(b: Built, trainer: Trainer, run: RunDir) -> None:
    """Train, then evaluate on the main process; a stop signal at any point ends the run
    ``interrupted`` (exit 130) with its last checkpoint on disk."""
    try:
        with stopping.installed():
            throughput = _train(b, trainer, run)
            if b.dist.is_main:
                _write_throughput(run, throughput, trainer)
                _evaluate_trained(b, trainer, run)
    except stopping.Interrupted as e:
        status = run.status()
        if status.get("pid") == os.getpid() and status.get("status") in (
            "failed",
            "oom",
            "diverged",
        ):
            # the signal came while it went down (torchrun stops the ranks left after one
            # crashed): the reason it recorded stands
            raise SystemExit(1) from None
        reason = str(e)
        if e.step is None:  # outside the training loop: training's checkpoint is what is saved
            reason += f" (the checkpoint of step {trainer.state.step} is saved; rerun to go on)"
        _record(run, b.dist, "interrupted", reason, step=trainer.state.step)
        raise SystemExit(stopping.EXIT_INTERRUPTED) from None
    distributed.barrier()


def _train(b: Built, trainer: Trainer, run: RunDir) -> dict[str, Any]:
    spec, dist = b.spec, b.dist
    costs = count_costs(
        trainer.step_module, per_rank_batch=spec.train.batch_size // dist.world_size,
        image_size=models.image_size(b.model_cfg), context_length=models.context_length(b.model_cfg),
        device=dist.device, autocast_ctx=autocast(dist.device, spec.train.precision),
    )  # fmt: skip
    if dist.is_main:
        write_json_atomic(run.costs, costs)
        run.write_status("running", step=trainer.state.step)
    try:
        throughput = trainer.fit()
    except Diverged as e:
        _diverged(run, dist, str(e), step=e.step)
    except torch.OutOfMemoryError as e:
        _record(run, dist, "oom", str(e).splitlines()[0], step=trainer.state.step)
        raise
    except (stopping.Interrupted, SystemExit):
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {errors.message(e)}"  # an OSError: the path and why
        _record(run, dist, "failed", reason, traceback=traceback.format_exc().splitlines()[-12:])
        raise
    if stopping.requested():  # came with the last step: training is done and checkpointed
        raise stopping.Interrupted(stopping.requested(), where=" before evaluation")
    return throughput


def _write_throughput(run: RunDir, throughput: dict[str, Any], trainer: Trainer) -> None:
    throughput["corrupt_samples"] = trainer.state.corrupt_samples
    throughput["duplicate_images"] = trainer.state.duplicate_images
    if throughput["measured_steps"] or not run.throughput.exists():
        # a resumed run with no step left (its evaluation failed) keeps its real figures
        write_json_atomic(run.throughput, throughput)


def _evaluate_trained(b: Built, trainer: Trainer, run: RunDir) -> None:
    step = trainer.state.step
    try:
        metrics = evaluate_into(run, b, trainer.model)
    except NonFiniteEmbeddings as e:  # trained to a model that gives NaN: it diverged
        _diverged(run, b.dist, f"{EVALUATION_FAILED} {e}", step=step)
    except stopping.Interrupted as e:
        raise stopping.Interrupted(e.signum, where=" during evaluation") from None
    except Exception as e:  # trained and checkpointed: `python -m harness.evaluate` can redo it
        reason = f"{EVALUATION_FAILED} {type(e).__name__}: {errors.message(e)}"
        tail = traceback.format_exc().splitlines()[-12:]
        _record(run, b.dist, "failed", reason, step=step, traceback=tail)
        raise
    run.write_status(FINISHED, step=step)
    print(json.dumps({k: round(v, 2) for k, v in metrics.items()}, indent=1))


def _diverged(run: RunDir, dist: DistInfo, reason: str, *, step: int) -> NoReturn:
    """Record the divergence, say so in one line and exit with EXIT_DIVERGED (a grid goes on)."""
    _record(run, dist, "diverged", reason, step=step)
    if dist.is_main:
        print(f"error: {run.path} diverged: {reason}", file=sys.stderr)
    raise SystemExit(EXIT_DIVERGED) from None


def _record(run: RunDir, dist: DistInfo, status: str, reason: str, **extra: Any) -> None:
    if dist.is_main:
        run.write_status(status, reason=reason, **extra)


def evaluate_into(run: RunDir, b: Built, model: torch.nn.Module) -> dict[str, float]:
    """Evaluate ``model`` on the stage's data; write eval.json and eval_ranks.json."""
    metrics, per_query = evaluate(
        b.method, model, b.manifest, b.spec.eval, image_size=models.image_size(b.model_cfg),
        context_length=models.context_length(b.model_cfg), device=b.dist.device,
    )  # fmt: skip
    write_json_atomic(run.eval_ranks, per_query)
    write_json_atomic(run.eval, metrics)
    return metrics
