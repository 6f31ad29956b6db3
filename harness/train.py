"""One run, end to end: validate, build, train, evaluate, write the run directory.

Everything a user can get wrong is checked before any compute is spent (method, model, data,
batch size against world size and dataset), and each problem is one clear error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from harness import (
    checkpoint,
    config,
    distributed,
    errors,
    faults,
    host_memory,
    models,
    rundir,
    stopping,
)
from harness.config import ConfigError, RunSpec
from harness.costs import count_costs
from harness.data import loader_readers, resolve_manifest, smallest_reader_epoch
from harness.distributed import DistInfo
from harness.evaluate import NonFiniteEmbeddings, evaluate
from harness.manifest import Manifest, writable_dir, write_json_atomic, write_text_atomic
from harness.trainer import Diverged, Trainer, autocast, config_record
from methods import Method, RunInfo, build_method, other_methods

EXIT_DIVERGED = 3


@dataclass
class Built:
    spec: RunSpec
    method: Method
    model_cfg: dict[str, Any]
    manifest: Manifest
    dist: DistInfo


def validate(spec: RunSpec, dist: DistInfo) -> tuple[Method, dict[str, Any], Manifest]:
    """Every check that needs no training; raises one clear error for the first problem."""
    method = build_method(spec.run.method)
    model_cfg = models.model_config(spec.run.model)
    if spec.train.batch_size % dist.world_size:
        raise ConfigError(
            f"BATCH_SIZE={spec.train.batch_size} is not divisible by the number of processes "
            f"({dist.world_size})"
        )
    manifest = _manifest_once(spec, dist)
    check_data_fits(spec, manifest, dist.world_size)
    return method, model_cfg, manifest


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


def _manifest_once(spec: RunSpec, dist: DistInfo) -> Manifest:
    """The main process builds the built-in dataset if needed; the others wait, then read it."""
    if dist.is_main:
        manifest = resolve_manifest(spec.data)
    distributed.barrier()
    if not dist.is_main:
        manifest = resolve_manifest(spec.data)
    return manifest


def default_run_dir(spec: RunSpec, model_cfg: dict[str, Any], root: str | Path = "runs") -> Path:
    name = f"{spec.run.method}-b{spec.train.batch_size}-s{spec.train.seed}"
    return Path(root) / f"{name}-{config.config_hash(model_cfg)}"


def prepare_run_dir(run_dir: Path, *, resume: bool) -> bool:
    """True if training should resume from the run's checkpoint."""
    has_ckpt = checkpoint.latest(run_dir).exists()
    if has_ckpt and not resume:
        raise ConfigError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, "
            f"or choose another --out"
        )
    writable_dir(run_dir)
    return has_ckpt and resume


def write_provenance(run_dir: Path, b: Built, derived: dict[str, Any]) -> None:
    write_text_atomic(run_dir / "operative_config.gin", config.operative_config())
    write_text_atomic(run_dir / "config.gin", config.full_config())
    record = {
        "method": b.method.name,
        "method_decisions": list(b.method.decisions),
        "method_info": b.method.info(),
        "model": b.spec.run.model,
        "model_config": b.model_cfg,
        "data": {
            "manifest": str(b.manifest.root.resolve() / "manifest.json"),
            "name": b.manifest.name,
        },
        "train": derived,
        "data_config": asdict(b.spec.data),
        "eval_config": asdict(b.spec.eval),
        "world_size": b.dist.world_size,
        "device": rundir.device_name(b.dist.device),
        "git_commit": rundir.git_commit(),
        "packages": rundir.package_versions(),
        "config_hash": config.config_hash(b.model_cfg),
    }
    write_json_atomic(run_dir / "run.json", record)


# Bindings that cannot change a run's results: a run may be resumed with other values (a fault
# injected into the first attempt, a different checkpoint or logging interval).
NOT_RESULT_PARAMS = frozenset({"Faults.spec", "TrainConfig.checkpoint_every_samples",
                               "TrainConfig.log_every_steps", "TrainConfig.progress_bar"})  # fmt: skip


def check_same_config(run_dir: Path, spec: RunSpec, method: Method) -> None:
    """A finished or resumable run directory belongs to the config it was started with: reporting
    its results for another config, or continuing its checkpoint under one, would be wrong."""
    saved = run_dir / "config.gin"
    if not saved.exists():
        return
    run = RunInfo(spec.train.batch_size, spec.train.train_samples, spec.run.model)
    inputs = frozenset(param for stage in method.stages(run) for param in stage.inputs)
    diff = config.differing_bindings(
        saved.read_text(),
        ignore=other_methods(spec.run.method),  # as the shared-stage hash
        ignore_params=inputs | NOT_RESULT_PARAMS,
    )
    if diff:
        shown = "\n  ".join(diff[:8]) + ("\n  ..." if len(diff) > 8 else "")
        raise ConfigError(
            f"{run_dir} holds a run of another config; {saved} differs from this one in:\n"
            f"  {shown}\nchoose another --out, or run it with the config it was started with"
        )


def set_deterministic() -> None:
    """Repeatable kernels: resumed and uninterrupted runs then agree (tests/test_run.py)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def run_one(run_dir: Path | None, *, resume: bool = False) -> Path:
    """Train and evaluate the currently parsed config into ``run_dir``; returns the run dir."""
    spec = config.resolve()
    try:
        faults.activate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    b = build(spec)
    run_dir = Path(run_dir) if run_dir else default_run_dir(spec, b.model_cfg)
    finished = rundir.is_finished(run_dir)
    if finished or (resume and checkpoint.latest(run_dir).exists()):
        check_same_config(run_dir, spec, b.method)
    if finished:
        print(f"{run_dir}: already finished; results in {run_dir / 'eval.json'}")
        return run_dir
    resuming = prepare_run_dir(run_dir, resume=resume)
    left = rundir.left_running(run_dir) if b.dist.is_main else None  # we hold its lock
    if left:
        then = "resuming from its checkpoint" if resuming else "starting it again"
        print(f"note: {left}; {then}", file=sys.stderr)
    trainer = build_trainer(b, run_dir)
    if b.dist.is_main:
        write_provenance(run_dir, b, config_record(spec.train))
    if resuming:
        trainer.resume(checkpoint.latest(run_dir))
    try:
        _train_and_evaluate(b, trainer, run_dir)
    finally:
        trainer.close()
    return run_dir


def build(spec: RunSpec) -> Built:
    """Join the process group and validate: everything but the model (also used by bench/)."""
    dist = distributed.init(spec.run.device)
    method, model_cfg, manifest = validate(spec, dist)
    return Built(spec, method, model_cfg, manifest, dist)


def build_trainer(b: Built, run_dir: Path) -> Trainer:
    """The seeded model and its trainer (also what bench/ times)."""
    if b.dist.device.type == "cpu":
        host_memory.keep_freed_memory()  # large per-step tensors are reused, not re-faulted
    if b.spec.train.deterministic:
        set_deterministic()
    torch.manual_seed(b.spec.train.seed)
    model = b.method.build_model(b.model_cfg)
    return Trainer(
        method=b.method, model=model, config=b.spec.train, data_config=b.spec.data,
        manifest=b.manifest, run_dir=run_dir, dist=b.dist,
        image_size=models.image_size(b.model_cfg), context_length=models.context_length(b.model_cfg),
    )  # fmt: skip


def _train_and_evaluate(b: Built, trainer: Trainer, run_dir: Path) -> None:
    """Train, then evaluate on the main process; a stop signal at any point ends the run
    ``interrupted`` (exit 130) with its last checkpoint on disk."""
    try:
        with stopping.installed():
            throughput = _train(b, trainer, run_dir)
            if b.dist.is_main:
                _write_throughput(run_dir, throughput, trainer)
                _evaluate_trained(b, trainer, run_dir)
    except stopping.Interrupted as e:
        if _failed_already(run_dir):  # the signal came while it went down (torchrun stops the
            raise SystemExit(1) from None  # ranks left after one crashed): its reason stands
        reason = str(e)
        if e.step is None:  # outside the training loop: training's checkpoint is what is saved
            reason += f" (the checkpoint of step {trainer.state.step} is saved; rerun to go on)"
        _record_failure(run_dir, b.dist, "interrupted", reason, step=trainer.state.step)
        raise SystemExit(stopping.EXIT_INTERRUPTED) from None
    distributed.barrier()


def _failed_already(run_dir: Path) -> bool:
    status = rundir.read_status(run_dir) or {}
    return status.get("pid") == os.getpid() and status.get("status") in (
        "failed",
        "oom",
        "diverged",
    )


def _train(b: Built, trainer: Trainer, run_dir: Path) -> dict[str, Any]:
    spec, dist = b.spec, b.dist
    costs = count_costs(
        trainer.step_module, per_rank_batch=spec.train.batch_size // dist.world_size,
        image_size=models.image_size(b.model_cfg), context_length=models.context_length(b.model_cfg),
        device=dist.device, autocast_ctx=autocast(dist.device, spec.train.precision),
    )  # fmt: skip
    if dist.is_main:
        write_json_atomic(run_dir / "costs.json", costs)
        rundir.write_status(run_dir, "running", step=trainer.state.step)
    try:
        throughput = trainer.fit()
    except Diverged as e:
        _diverged(run_dir, dist, str(e), step=e.step)
    except torch.OutOfMemoryError as e:
        _record_failure(run_dir, dist, "oom", str(e).splitlines()[0], step=trainer.state.step)
        raise
    except (stopping.Interrupted, SystemExit):
        raise
    except Exception as e:
        tail = traceback.format_exc().splitlines()[-12:]
        reason = f"{type(e).__name__}: {errors.message(e)}"  # an OSError: the path and why
        _record_failure(run_dir, dist, "failed", reason, traceback=tail)
        raise
    if stopping.requested():  # came with the last step: training is done and checkpointed
        raise stopping.Interrupted(stopping.requested(), where=" before evaluation")
    return throughput


def _write_throughput(run_dir: Path, throughput: dict[str, Any], trainer: Trainer) -> None:
    throughput["corrupt_samples"] = trainer.state.corrupt_samples
    throughput["duplicate_images"] = trainer.state.duplicate_images
    if throughput["measured_steps"] or not (run_dir / "throughput.json").exists():
        # a resumed run with no step left (its evaluation failed) keeps its real figures
        write_json_atomic(run_dir / "throughput.json", throughput)


def _evaluate_trained(b: Built, trainer: Trainer, run_dir: Path) -> None:
    step = trainer.state.step
    try:
        metrics = _evaluate(b, trainer.model, run_dir)
    except NonFiniteEmbeddings as e:  # trained to a model that gives NaN: it diverged
        _diverged(run_dir, b.dist, f"{EVALUATION_FAILED} {e}", step=step)
    except stopping.Interrupted as e:
        raise stopping.Interrupted(e.signum, where=" during evaluation") from None
    except Exception as e:  # trained and checkpointed: `python -m harness.evaluate` can redo it
        reason = f"{EVALUATION_FAILED} {type(e).__name__}: {errors.message(e)}"
        tail = traceback.format_exc().splitlines()[-12:]
        _record_failure(run_dir, b.dist, "failed", reason, step=step, traceback=tail)
        raise
    rundir.write_status(run_dir, rundir.FINISHED, step=step)
    print(json.dumps({k: round(v, 2) for k, v in metrics.items()}, indent=1))


EVALUATION_FAILED = "evaluation:"  # status reason prefix: trained, but not evaluated


def _diverged(run_dir: Path, dist: DistInfo, reason: str, *, step: int) -> NoReturn:
    """Record the divergence, say so in one line and exit with EXIT_DIVERGED (a grid goes on)."""
    _record_failure(run_dir, dist, "diverged", reason, step=step)
    if dist.is_main:
        print(f"error: {run_dir} diverged: {reason}", file=sys.stderr)
    raise SystemExit(EXIT_DIVERGED) from None


def _record_failure(run_dir: Path, dist: DistInfo, status: str, reason: str, **extra: Any) -> None:
    if dist.is_main:
        rundir.write_status(run_dir, status, reason=reason, **extra)


def _evaluate(b: Built, model: torch.nn.Module, run_dir: Path) -> dict[str, float]:
    metrics, per_query = evaluate(
        b.method, model, b.manifest, b.spec.eval, image_size=models.image_size(b.model_cfg),
        context_length=models.context_length(b.model_cfg), device=b.dist.device,
    )  # fmt: skip
    write_json_atomic(run_dir / "eval_ranks.json", per_query)
    write_json_atomic(run_dir / "eval.json", metrics)
    return metrics


def evaluate_run_dir(run_dir: str | Path, *, device: str = "auto") -> dict[str, float]:
    """Rebuild model and method from a run directory alone, load its checkpoint, evaluate.

    A multi-stage directory (a grid cell) evaluates its last stage, the method's result. The
    run's lock is held meanwhile: a run still training is refused, not evaluated half-way.
    """
    run_dir = rundir.final_run_dir(Path(run_dir))
    record = rundir.read_json(run_dir / "run.json")
    if record is None or not (run_dir / "operative_config.gin").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no run.json / operative_config.gin)")
    writable_dir(run_dir)  # before the work: its results are written there
    with rundir.held(rundir.guarding_dir(run_dir), doing="evaluating"):
        return _evaluate_run_dir(run_dir, record, device)


def _evaluate_run_dir(run_dir: Path, record: dict[str, Any], device: str) -> dict[str, float]:
    config.parse(
        [run_dir / "operative_config.gin"], rundir.earlier_stages_now(run_dir), trusted=False
    )
    spec = config.resolve()
    dist = distributed.init(device)
    method = build_method(record["method"])
    model = method.build_model(record["model_config"])
    state = checkpoint.load(checkpoint.latest(run_dir))
    checkpoint.load_state_strict(model, state["model"], "model")
    checkpoint.load_state_strict(method, state["method"], "method state")
    model.to(dist.device)
    method.to(dist.device)
    data = replace(spec.data, manifest=record["data"]["manifest"])
    manifest = resolve_manifest(data)
    b = Built(spec, method, record["model_config"], manifest, dist)
    try:
        metrics = _evaluate(b, model, run_dir)
    except NonFiniteEmbeddings as e:
        raise NonFiniteEmbeddings(f"{run_dir}: {e}") from None
    status = rundir.read_status(run_dir) or {}
    if str(status.get("reason", "")).startswith(EVALUATION_FAILED):  # now evaluated: finished
        rundir.write_status(run_dir, rundir.FINISHED, step=status.get("step"))
    return metrics
