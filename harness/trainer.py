"""The one trainer: every method, one process or many, CPU or GPU.

The loop asks the method for its outputs and named terms, sums the terms whose key ends in
``_loss``, steps AdamW, and lets the method run its ``after_step``. It has no method-specific
branch: whatever a method needs (extra parameter groups, buffers, restarts) goes through the
method interface.

Budgets are counted in samples: ``train_samples`` and ``warmup_samples`` become steps for the
configured batch size, so a smaller batch takes more steps for the same data (the sweep's
equal-footing rule). Derived values are computed here and recorded in ``run.json``.
"""

from __future__ import annotations

import contextlib
import math
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gin
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from harness import checkpoint, distributed, faults, stopping
from harness.config import ConfigError
from harness.data import (
    DataConfig,
    batch_positions,
    loader_readers,
    prepare_batch,
    train_loader,
)
from harness.distributed import DistInfo
from harness.manifest import Manifest
from harness.metrics import HostLoad, MetricsLogger, NvmlSampler, PeakMemory
from methods.base import Method

LR_RULES = ("none", "linear", "sqrt")
BUDGETS = ("samples", "steps", "wallclock")


@gin.configurable
@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and budget. ``batch_size`` is global (all ranks together).

    Budgets: ``samples`` (default) trains ceil(train_samples / batch_size) steps, so every batch
    size sees the same data; ``steps`` trains ``train_steps`` steps whatever the batch; and
    ``wallclock`` trains for ``train_seconds`` (capped at the samples budget), with the cosine
    schedule following elapsed time. Warmup is always counted in samples.
    """

    batch_size: int = 64
    train_samples: int = 40_000
    budget: str = "samples"
    train_steps: int = 0  # budget="steps"
    train_seconds: float = 0.0  # budget="wallclock"
    warmup_samples: int = 4_000
    seed: int = 0
    lr: float = 1e-3  # the learning rate at base_batch
    lr_rule: str = "none"  # how lr scales with batch_size / base_batch: none, linear, sqrt
    base_batch: int = 64
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float = 0.0  # 0 disables clipping
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "fp32", "bf16"
    log_every_steps: int = 10
    checkpoint_every_samples: int = 20_000  # 0: only at the end (and on interrupt)
    progress_bar: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable kernels
    compile: bool = False  # torch.compile the method's forward and loss (model included)
    # Recompute each transformer block's activations in backward: about one more forward of
    # compute for activation memory of a block at a time (how a large tower fits a big batch).
    # The FLOP count, and so MFU, then includes the recomputation.
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size > 0,
            "train_samples": self.train_samples > 0,
            "warmup_samples": self.warmup_samples >= 0,
            "lr": self.lr > 0,
            "base_batch": self.base_batch > 0,
            "log_every_steps": self.log_every_steps > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)!r} is out of range")
        if self.budget not in BUDGETS:
            raise ValueError(f"TrainConfig.budget={self.budget!r}; choose one of {BUDGETS}")
        if self.budget == "steps" and self.train_steps <= 0:
            raise ValueError("TrainConfig.budget='steps' needs TrainConfig.train_steps > 0")
        if self.budget == "wallclock" and self.train_seconds <= 0:
            raise ValueError("TrainConfig.budget='wallclock' needs TrainConfig.train_seconds > 0")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"TrainConfig.lr_rule={self.lr_rule!r}; choose one of {LR_RULES}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}; choose auto, fp32 or bf16")

    # -- derived values (computed in code, never in gin) --------------
    @property
    def total_steps(self) -> int:
        """Steps to train (for ``wallclock``: the cap; time usually ends the run first)."""
        if self.budget == "steps":
            return self.train_steps
        return math.ceil(self.train_samples / self.batch_size)

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, round(self.warmup_samples / self.batch_size))

    @property
    def scaled_lr(self) -> float:
        ratio = self.batch_size / self.base_batch
        factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_rule]
        return self.lr * factor

    def derived(self) -> dict[str, Any]:
        # a time budget usually ends the run before its step cap: status.json's step is what ran
        samples = "samples_cap" if self.budget == "wallclock" else "samples_seen"
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "scaled_lr": self.scaled_lr,
            samples: self.total_steps * self.batch_size,
        }


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in every open_clip transformer of ``model``.

    open_clip's transformers check their own ``grad_checkpointing`` flag per block, so this
    reaches every tower a method builds (a CLIP, a lone vision tower, a student's blocks). open_clip
    calls a block as ``block(x, None, None, attn_mask)`` when recomputing, which only its default
    ``ResidualAttentionBlock`` accepts: other blocks (``block_type: custom``, SAS-P) are refused.
    """
    towers = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    blocks = [b for tower in towers for b in getattr(tower, "resblocks", ())]
    other = sorted({type(b).__name__ for b in blocks} - {ResidualAttentionBlock.__name__})
    if not blocks or other:
        found = f"blocks of type {', '.join(other)}" if other else "no open_clip transformer"
        raise ConfigError(
            f"TrainConfig.grad_checkpointing=True, but the model ({type(model).__name__}) has "
            f"{found}: open_clip recomputes only its default ResidualAttentionBlock (a model "
            "config without block_type 'custom')"
        )
    for tower in towers:
        tower.grad_checkpointing = True


def lr_multiplier(
    step: int, *, warmup: int, total: int, min_ratio: float, progress: float | None = None
) -> float:
    """Linear warmup to 1, then cosine to ``min_ratio`` at the end of the budget.

    ``progress`` (fraction of the budget used, for time budgets) overrides the step-based one.
    """
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BudgetClock:
    """Training time used so far, across resumes (for the wall-clock budget).

    ``progress`` is the fraction of ``seconds`` used as last agreed by all ranks (the largest
    rank's, at log steps): the learning-rate schedule reads it rather than each rank's own
    clock, so every rank steps with the same rate, and no step waits for a collective.
    """

    def __init__(self, seconds: float = 0.0, used: float = 0.0):
        self.seconds, self.used, self._since = seconds, used, time.perf_counter()
        self.progress = self._fraction_of(used)

    def elapsed(self) -> float:
        return self.used + time.perf_counter() - self._since

    def restore(self, used: float) -> None:
        """Continue from a checkpoint's ``used`` seconds (the same number on every rank)."""
        self.used, self._since = used, time.perf_counter()
        self.progress = self._fraction_of(used)

    def agree(self) -> float:
        """Set ``progress`` to the largest fraction used on any rank, and return it."""
        self.progress = distributed.max_over_ranks(self._fraction_of(self.elapsed()))
        return self.progress

    def _fraction_of(self, seconds: float) -> float:
        return min(1.0, seconds / self.seconds) if self.seconds > 0 else 0.0


class TrainStep(nn.Module):
    """model + method as one module, so DDP and checkpoints see the method's own state.

    Returns ``{"loss": the summed *_loss terms, **every term detached}``: the sum is the one
    output that carries gradient (summing inside also keeps torch.compile, when on, clear of a
    failure with outputs that alias a detached term).
    """

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = self.method.loss(self.method(self.model, batch))
        return {"loss": total_loss(terms), **{k: v.detach() for k, v in terms.items()}}


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [v for k, v in terms.items() if k.endswith("_loss")]
    if not losses:
        raise ValueError(f"method returned no '*_loss' term, only {sorted(terms)}")
    return torch.stack([v.float() for v in losses]).sum()


def build_optimizer(
    method: Method, model: nn.Module, config: TrainConfig, clock: BudgetClock | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = method.param_groups(model, lr=config.scaled_lr, weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        groups, betas=(config.beta1, config.beta2), eps=config.eps, fused=fused
    )

    def schedule(step: int) -> float:
        timed = clock is not None and clock.seconds > 0  # the cosine follows time, not steps
        return lr_multiplier(
            step,
            warmup=config.warmup_steps,
            total=config.total_steps,
            min_ratio=config.min_lr_ratio,
            progress=clock.progress if timed else None,
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Diverged(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"loss became NaN or inf at step {step}")
        self.step = step


@dataclass
class TrainState:
    step: int = 0
    corrupt_samples: int = 0
    # images that were in a global batch more than once (several ranks only: one reader's
    # batch never holds an image twice, but two ranks' readers can at an epoch boundary)
    duplicate_images: int = 0
    # samples each of this rank's loader readers has consumed, corrupt ones included: where a
    # resumed run's readers start (a batch count alone would miss the corrupt samples)
    reader_samples: list[int] | None = None
    # per reader: positions among those samples that wait for a batch (an image already in
    # the batch being filled, at an epoch boundary); a resumed reader keeps them
    reader_pending: list[list[int]] | None = None


class Trainer:
    """Owns the loop, the optimiser, logging and checkpoints of one run."""

    def __init__(
        self,
        *,
        method: Method,
        model: nn.Module,
        config: TrainConfig,
        data_config: DataConfig,
        manifest: Manifest,
        run_dir: Path,
        dist: DistInfo,
        image_size: int,
        context_length: int,
    ):
        self.method, self.model, self.config, self.dist = method, model, config, dist
        self.run_dir = Path(run_dir)
        if config.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.step_module = TrainStep(model, method).to(dist.device)
        self.train_step_fn = self.step_module
        if dist.world_size > 1:
            self.train_step_fn = DistributedDataParallel(
                self.step_module,
                device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                forward_sync_buffers=False,  # method buffers are kept in sync by the method itself
            )
        if config.compile:
            # Fuses the elementwise work between matmuls; backward and AdamW stay eager. Code a
            # method cannot have traced (collectives, RNG generators) runs eagerly between graphs.
            self.train_step_fn = torch.compile(self.train_step_fn)
        seconds = config.train_seconds if config.budget == "wallclock" else 0.0
        self.clock = BudgetClock(seconds)
        self.optimizer, self.scheduler = build_optimizer(method, model, config, self.clock)
        self.state = TrainState()
        self.loader_args = dict(
            manifest=manifest,
            config=data_config,
            per_rank_batch=config.batch_size // dist.world_size,
            image_size=image_size,
            context_length=context_length,
            seed=config.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.logger = MetricsLogger(self.run_dir, enabled=dist.is_main)
        # called with the step number after every step (bench/ times steps with it); None: off
        self.on_step: Callable[[int], None] | None = None

    # -- checkpoints --------------------------------------------------
    def checkpoint_payload(
        self, reader_samples: list[list[int]], reader_pending: list[list[list[int]]]
    ) -> dict[str, Any]:
        """Everything a resumed run needs; ``reader_samples`` and ``reader_pending``: every
        rank's, [rank][reader]."""
        return {
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.state.step,
            "samples_seen": self.state.step * self.config.batch_size,
            "corrupt_samples": self.state.corrupt_samples,
            "duplicate_images": self.state.duplicate_images,
            "data_position": {
                "batches_consumed": self.state.step,
                "reader_samples": reader_samples,
                "reader_pending": reader_pending,
            },
            "train_seconds_used": self.clock.elapsed(),
            "rng": checkpoint.rng_state(),
            "world_size": self.dist.world_size,
            "batch_size": self.config.batch_size,
        }

    def _gather_reader_positions(self) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Every rank's reader samples and pending positions (a collective: all ranks call it)."""
        mine = (self._reader_samples(), self._reader_pending())
        everyone = distributed.all_gather_object(mine)
        return [samples for samples, _ in everyone], [pending for _, pending in everyone]

    def _reader_pending(self) -> list[list[int]]:
        if self.state.reader_pending is None:
            return [[] for _ in self._reader_samples()]
        return self.state.reader_pending

    def _reader_samples(self) -> list[int]:
        if self.state.reader_samples is None:  # nothing consumed yet in this process
            return batch_positions(
                self.state.step, self.loader_args["config"].num_workers,
                self.loader_args["per_rank_batch"],
            )  # fmt: skip
        return self.state.reader_samples

    def save_checkpoint(self) -> None:
        positions = self._gather_reader_positions()
        if self.dist.is_main:
            checkpoint.save(checkpoint.latest(self.run_dir), self.checkpoint_payload(*positions))
        distributed.barrier()

    def resume(self, path: Path) -> None:
        state = checkpoint.load(path, map_location=self.dist.device)
        # another world size splits the data across ranks differently: not the same run either
        for key, now in (
            ("batch_size", self.config.batch_size),
            ("world_size", self.dist.world_size),
        ):
            if state.get(key) != now:
                raise checkpoint.CheckpointError(
                    f"{path}: saved with {key}={state.get(key)}, this run has {key}={now}"
                )
        checkpoint.load_state_strict(self.model, state["model"], "model")
        checkpoint.load_state_strict(self.method, state["method"], "method state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # older checkpoints have no reader positions; another worker count deals the shards to
        # readers differently, so its positions mean nothing here: both skip by batches
        position = state.get("data_position", {})
        readers, pending = position.get("reader_samples"), position.get("reader_pending")
        mine = readers[self.dist.rank] if readers else None
        if mine is not None and len(mine) != loader_readers(self.loader_args["config"].num_workers):
            mine = None
        self.state = TrainState(
            step=state["step"], corrupt_samples=state.get("corrupt_samples", 0),
            duplicate_images=state.get("duplicate_images", 0), reader_samples=mine,
            reader_pending=pending[self.dist.rank] if mine is not None and pending else None,
        )  # fmt: skip
        self.clock.restore(state.get("train_seconds_used", 0.0))
        checkpoint.set_rng_state(state["rng"])

    # -- the loop -----------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the budget; return a throughput summary. Raises Diverged, or
        ``stopping.Interrupted`` after a stop signal (with the checkpoint of that step saved)."""
        cfg = self.config
        self.clock.restore(self.clock.used)  # the time budget counts from here, not set-up
        self.logger.open(from_step=self.state.step)
        self.state.reader_samples = self._reader_samples()
        self.state.reader_pending = self._reader_pending()
        loader = iter(
            train_loader(
                **self.loader_args, skip_batches=self.state.step,
                # copies: the loop updates the state's
                skip_samples=list(self.state.reader_samples),
                skip_pending=[list(p) for p in self.state.reader_pending],
            )
        )  # fmt: skip
        self.step_module.train()
        meter = _Meter(self.dist.device)
        bad_step = torch.full((), -1, dtype=torch.long, device=self.dist.device)
        ckpt_every = (
            max(1, cfg.checkpoint_every_samples // cfg.batch_size)
            if cfg.checkpoint_every_samples
            else 0
        )
        bar = tqdm(
            total=cfg.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
            disable=not (self.dist.is_main and cfg.progress_bar), desc=self.method.name,
        )  # fmt: skip
        timing = _Timing(self.dist.device)
        stop = distributed.StopVote()
        try:
            with stopping.installed(), stopping.deferred(), timing:
                while self.state.step < cfg.total_steps:
                    t0 = time.perf_counter()
                    batch = next(loader)
                    t_data = time.perf_counter()
                    # batch i comes from reader i % readers (round-robin); a CPU tensor: no sync
                    reader = self.state.step % len(self.state.reader_samples)
                    self.state.reader_samples[reader] = int(batch["consumed"])
                    self.state.reader_pending[reader] = batch["pending"].tolist()
                    faults.at_step(self.state.step, self.dist.rank)
                    terms = self._one_step(prepare_batch(batch, self.dist.device))
                    loss = terms["loss"].detach()
                    # device-side NaN watch: no host sync per step; checked when we log anyway
                    bad = ~torch.isfinite(loss) & (bad_step < 0)
                    bad_step = torch.where(bad, self.state.step, bad_step)  # a number: no copy
                    meter.add(terms, int(batch["corrupt"]), self._duplicates(batch["index"]))
                    self.state.step += 1
                    timing.add(t_data - t0, time.perf_counter() - t0)
                    bar.update(1)
                    if self.on_step is not None:
                        self.on_step(self.state.step)
                    done = self.state.step == cfg.total_steps
                    if self.state.step % cfg.log_every_steps == 0 or done:
                        self._log(meter, timing, bar, bad_step)
                        if self.clock.seconds and not done:  # all ranks agree when time is up
                            done = self.clock.agree() >= 1.0
                    if stop.cast(stopping.requested() is not None) and not done:
                        stop.close()
                        self._stop_here(meter, timing, bar, bad_step)
                    if (ckpt_every and self.state.step % ckpt_every == 0) or done:
                        self._check_finite(bad_step)
                        with timing.paused():  # checkpoint I/O is not step time
                            self.save_checkpoint()
                    if done:
                        break
        finally:
            del loader  # its workers end now, not when a stop's traceback is collected
        stop.close()
        bar.close()
        return timing.summary(cfg.batch_size, self._host_cpu_seconds(timing.host))

    def _host_cpu_seconds(self, host: HostLoad) -> float:
        """The CPU time every rank on this machine used (a collective: all ranks call it):
        the other ranks are this run, not other processes contending for the machine."""
        here = socket.gethostname()
        ranks = distributed.all_gather_object((here, host.own_seconds()))
        return sum(seconds for name, seconds in ranks if name == here)

    def _stop_here(self, meter: _Meter, timing: _Timing, bar: tqdm, bad_step: torch.Tensor):
        """A stop signal: log what the interval has, checkpoint this step, raise Interrupted."""
        if meter.count:
            self._log(meter, timing, bar, bad_step)  # also refuses to checkpoint a NaN
        with timing.paused():
            self.save_checkpoint()
        bar.close()
        raise stopping.Interrupted(stopping.requested(), self.state.step)

    def _one_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = self._forward(batch)
        self._backward(terms["loss"])
        self._optimizer_step()
        return terms

    # The step's phases, separate so that bench/ can time each one on the same code path.
    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's forward, loss and terms (``TrainStep``; through DDP with several ranks)."""
        with autocast(self.dist.device, self.config.precision):
            return self.train_step_fn(batch)

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def _optimizer_step(self) -> None:
        if self.config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                self.step_module.parameters(), self.config.grad_clip_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_step(self.model)

    def _duplicates(self, index: torch.Tensor) -> torch.Tensor | int:
        """Images held twice in this step's global batch, on the device (no host sync)."""
        if self.dist.world_size == 1:
            return 0  # one reader's batch: distinct by construction (harness.data)
        ordered = distributed.all_gather(index).sort().values
        return (ordered[1:] == ordered[:-1]).sum()

    def _check_finite(self, bad_step: torch.Tensor) -> None:
        step = int(bad_step.item())  # host sync
        if step >= 0:
            raise Diverged(step)

    def _log(self, meter: _Meter, timing: _Timing, bar: tqdm, bad_step: torch.Tensor) -> None:
        values = meter.flush()  # one host sync for every logged scalar
        self.state.corrupt_samples += values.pop("corrupt_samples")
        self.state.duplicate_images += values.pop("duplicate_images")
        self._check_finite(bad_step)
        interval = timing.flush_interval()
        record = {
            "samples": self.state.step * self.config.batch_size,
            "lr": self.optimizer.param_groups[0]["lr"],
            **values,
            "samples_per_s": interval["samples_per_step"] * self.config.batch_size,
            "step_time_ms": interval["step_ms"],
            "data_wait_ms": interval["data_ms"],
            "corrupt_samples": self.state.corrupt_samples,
            "duplicate_images": self.state.duplicate_images,
        }
        self.logger.log(record, step=self.state.step)
        bar.set_postfix(loss=f"{values['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")

    def close(self) -> None:
        self.logger.close()


class _Meter:
    """Sums of logged terms over a log interval, kept on the device until flushed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.corrupt = 0
        self.duplicates: torch.Tensor | int = 0

    def add(
        self, terms: dict[str, torch.Tensor], corrupt: int, duplicates: torch.Tensor | int = 0
    ) -> None:
        """``terms``: ``TrainStep``'s output, the summed loss first."""
        for key, value in terms.items():
            if value.numel() != 1:
                continue
            value = value.detach().float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1
        self.corrupt += corrupt
        self.duplicates = self.duplicates + duplicates

    def flush(self) -> dict[str, float]:
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).div(self.count).tolist() if keys else []
        out = dict(zip(keys, values, strict=True))
        out["corrupt_samples"] = self.corrupt
        out["duplicate_images"] = int(self.duplicates)
        self.sums, self.count, self.corrupt, self.duplicates = {}, 0, 0, 0
        return out


class _Timing:
    """Host-side step timing, with the run's peak memory and NVML sampling (a context manager:
    both start on entry). Interval means are exact once the log step has synchronised."""

    WARMUP_INTERVALS = 1  # the first logged interval (compilation, allocator warm-up) is excluded

    def __init__(self, device: torch.device):
        self.data = 0.0
        self.steps = 0
        self.start = time.perf_counter()
        self.intervals: list[dict[str, float]] = []
        self.peak = PeakMemory(device)
        self.gpu = NvmlSampler(device)
        self.host = HostLoad()

    def __enter__(self) -> _Timing:
        # not this run's peak: the FLOP count's passes, or a shared stage trained before in
        # this process (their freed heap is handed back; the warm-up interval pages it in again)
        self.peak.reset(release_freed=True)
        self.gpu.start()
        self.host.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.gpu.stop()
        self.host.stop()

    def add(self, data_s: float, step_s: float) -> None:
        self.data += data_s
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is left out of the current interval."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def flush_interval(self) -> dict[str, float]:
        now = time.perf_counter()
        wall = now - self.start
        interval = {
            "steps": self.steps,
            "wall_s": wall,
            "step_ms": 1000 * wall / max(1, self.steps),
            "data_ms": 1000 * self.data / max(1, self.steps),
            "samples_per_step": self.steps / max(wall, 1e-9),
        }
        self.intervals.append(interval)
        self.start, self.data, self.steps = now, 0.0, 0
        return interval

    def summary(self, batch_size: int, host_cpu_seconds: float | None = None) -> dict[str, Any]:
        """The run's figures; ``host_cpu_seconds``: CPU time of every rank on this machine."""
        kept = self.intervals[self.WARMUP_INTERVALS :] or self.intervals
        steps = sum(i["steps"] for i in kept)
        wall = sum(i["wall_s"] for i in kept)
        step_ms = [i["step_ms"] for i in kept]
        nan = float("nan")
        quantiles = statistics.quantiles(step_ms, n=10, method="inclusive") if len(kept) > 1 else []
        return {
            "samples_per_s": batch_size * steps / max(wall, 1e-9),
            "step_time_ms_median": statistics.median(step_ms) if step_ms else nan,
            "step_time_ms_p10": quantiles[0] if quantiles else None,  # one interval: no spread
            "step_time_ms_p90": quantiles[-1] if quantiles else None,
            "data_wait_fraction": sum(i["data_ms"] * i["steps"] for i in kept)
            / max(1e-9, 1000 * wall),
            "measured_steps": steps,
            "timing": "means of the intervals between log steps (host clock, synchronised at "
            "each log; the first interval and checkpoint writes left out)",
            "peak_memory_mb": self.peak.peak_mb(),
            "memory_kind": self.peak.kind,
            **{k if k.startswith("gpu_") else f"gpu_{k}": v for k, v in self.gpu.result().items()},
            "host_load": self.host.result(host_cpu_seconds),
        }


def config_record(config: TrainConfig) -> dict[str, Any]:
    return {**asdict(config), **config.derived()}
