"""The one trainer: every method, one process or many, CPU or GPU.

The loop reads a batch, steps, then lets each component act at its own cadence: ``Metrics``
logs, ``CheckpointManager`` saves, ``Optimization`` tells when a time budget is spent, and a
stop signal (``harness.stopping``) ends the run at the next step boundary with a checkpoint.
The step asks the method for its named terms, sums the ``*_loss`` ones, steps AdamW and lets
the method run its ``after_step``; there is no method-specific branch anywhere here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness import distributed, faults, stopping
from harness.checkpointing import CheckpointManager, TrainState
from harness.data.loader import prepare_batch, train_loader
from harness.distributed import DistInfo
from harness.manifest import Manifest
from harness.metrics import Metrics
from harness.optim import Optimization
from harness.rundir import RunDir
from harness.specs import DataConfig, TrainConfig
from harness.step import TrainStep, autocast, enable_grad_checkpointing
from methods.base import Method


class Diverged(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"loss became NaN or inf at step {step}")
        self.step = step


class Trainer:
    """One run's training: the step, its components, and the loop that drives them."""

    def __init__(
        self, *, method: Method, model: nn.Module, config: TrainConfig, data_config: DataConfig,
        manifest: Manifest, run: RunDir, dist: DistInfo, image_size: int, context_length: int,
    ):  # fmt: skip
        self.method, self.model, self.config, self.dist = method, model, config, dist
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
        self.optimization = Optimization(method, model, config)
        self.state = TrainState()
        per_rank = config.batch_size // dist.world_size
        self.loader_args = dict(
            manifest=manifest, config=data_config, per_rank_batch=per_rank, image_size=image_size,
            context_length=context_length, seed=config.seed, rank=dist.rank,
            world_size=dist.world_size,
        )  # fmt: skip
        every = max(1, config.checkpoint_every_samples // config.batch_size)
        self.checkpoints = CheckpointManager(
            run.checkpoint, every_steps=every if config.checkpoint_every_samples else 0,
            dist=dist, batch_size=config.batch_size, num_workers=data_config.num_workers,
        )  # fmt: skip
        self.metrics = Metrics(
            run.path, device=dist.device, log_every=config.log_every_steps,
            progress_bar=config.progress_bar, batch_size=config.batch_size, main=dist.is_main,
            name=method.name,
        )  # fmt: skip
        self._bad_step = torch.full((), -1, dtype=torch.long, device=dist.device)
        # called with the step number after every step (bench/ times steps with it); None: off
        self.on_step: Callable[[int], None] | None = None

    def resume(self) -> None:
        """Continue from the run's checkpoint: weights, method and optimiser state, position."""
        self.state = self.checkpoints.restore(self.model, self.method, self.optimization)

    def fit(self) -> dict[str, Any]:
        """Train to the budget; return the throughput summary. Raises Diverged, or
        ``stopping.Interrupted`` after a stop signal (with the checkpoint of that step saved)."""
        cfg, state = self.config, self.state
        self.optimization.clock.restore(self.optimization.clock.used)  # not the set-up time
        state.start_readers(
            self.loader_args["config"].num_workers, self.loader_args["per_rank_batch"]
        )
        loader = iter(train_loader(
            **self.loader_args, skip_batches=state.step, skip_samples=list(state.reader_samples),
            skip_pending=[list(p) for p in state.reader_pending],  # copies: the loop updates them
        ))  # fmt: skip
        self.step_module.train()
        self.metrics.start(state.step, cfg.total_steps)
        stop = distributed.StopVote()
        try:
            with stopping.installed(), stopping.deferred(), self.metrics.timing:
                while state.step < cfg.total_steps:
                    self._train_step(loader)
                    done = state.step == cfg.total_steps
                    if self.metrics.due(state.step, done):
                        self._log()
                        done = done or self.optimization.time_is_up()  # all ranks agree
                    if stop.cast(stopping.requested() is not None) and not done:
                        self._stop_here()
                    if self.checkpoints.due(state.step, done):
                        self._check_finite()
                        self.save_checkpoint()
                    if done:
                        break
        finally:
            stop.close()
            del loader  # its workers end now, not when a stop's traceback is collected
        self.metrics.close()
        return self.metrics.timing.summary(cfg.batch_size, self._host_cpu_seconds())

    def _train_step(self, loader) -> None:
        began = time.perf_counter()
        batch = next(loader)
        fetched = time.perf_counter()
        self.state.consumed(batch)
        faults.at_step(self.state.step, self.dist.rank)
        terms = self.step(prepare_batch(batch, self.dist.device))
        # device-side NaN watch: no host sync per step; checked when the run logs anyway
        bad = ~torch.isfinite(terms["loss"].detach()) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, self.state.step, self._bad_step)  # a number: no copy
        duplicates = self._duplicates(batch["index"])
        self.state.step += 1
        self.metrics.add(terms, batch, duplicates, data_s=fetched - began,
                         step_s=time.perf_counter() - began)  # fmt: skip
        if self.on_step is not None:
            self.on_step(self.state.step)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch on the device; returns the method's terms."""
        terms = self.forward(batch)
        self.backward(terms["loss"])
        self.optimizer_step()
        return terms

    # The step's phases, public so that bench/ times each one on the code path runs take.
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's forward, loss and terms (``TrainStep``; through DDP with several ranks)."""
        with autocast(self.dist.device, self.config.precision):
            return self.train_step_fn(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimization.zero_grad()
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimization.step()
        self.method.after_step(self.model)

    def _duplicates(self, index: torch.Tensor) -> torch.Tensor | int:
        """Images held twice in this step's global batch, on the device (no host sync)."""
        if self.dist.world_size == 1:
            return 0  # one reader's batch: distinct by construction (harness.data)
        ordered = distributed.all_gather(index).sort().values
        return (ordered[1:] == ordered[:-1]).sum()

    def _check_finite(self) -> None:
        step = int(self._bad_step.item())  # host sync
        if step >= 0:
            raise Diverged(step)

    def _log(self) -> None:
        self._check_finite()  # a NaN step is not logged, nor checkpointed
        self.metrics.log(self.state.step, self.optimization.lr, self.state)

    def save_checkpoint(self) -> None:
        """Checkpoint the run as it stands (a collective: every rank calls it)."""
        with self.metrics.timing.paused():  # checkpoint I/O is not step time
            self.checkpoints.save(self.model, self.method, self.optimization, self.state)

    def _stop_here(self) -> None:
        """A stop signal: log what the interval has, checkpoint this step, raise Interrupted."""
        self._log()
        self.save_checkpoint()
        raise stopping.Interrupted(stopping.requested(), self.state.step)

    def _host_cpu_seconds(self) -> float:
        """The CPU time every rank on this machine used (a collective: all ranks call it):
        the other ranks are this run, not other processes contending for the machine."""
        here = socket.gethostname()
        ranks = distributed.all_gather_object((here, self.metrics.timing.host.own_seconds()))
        return sum(seconds for name, seconds in ranks if name == here)

    def close(self) -> None:
        self.metrics.close()
