"""The trainer's checkpoints: when to save, what a resumed run needs, and resuming from one.

A checkpoint holds the model, the method's own state (heads, IDF buffers, prototypes), the
optimiser, schedule and training-time clock, every RNG state, the step and the data position:
each loader reader's consumed samples and the ones among them waiting for a batch, on every
rank. Saving is a collective (every rank's reader positions); only the main process writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from harness import checkpoint, distributed
from harness.data.stream import batch_positions, loader_readers
from harness.distributed import DistInfo
from harness.errors import CheckpointError
from harness.optim import Optimization


@dataclass
class TrainState:
    """What the loop has done so far; all of it is in the checkpoint."""

    step: int = 0
    corrupt_samples: int = 0
    # images that were in a global batch more than once (several ranks only: one reader's
    # batch never holds an image twice, but two ranks' readers can at an epoch boundary)
    duplicate_images: int = 0
    # per loader reader of this rank: samples of its stream consumed, corrupt ones included
    # (a batch count alone would miss those), and the positions among them waiting for a batch
    reader_samples: list[int] | None = None
    reader_pending: list[list[int]] | None = None

    def start_readers(self, num_workers: int, per_rank_batch: int) -> None:
        """Reader positions where none were saved (a fresh run, an older checkpoint, another
        worker count): counted from the batches trained, exact unless some were corrupt."""
        if self.reader_samples is None:
            self.reader_samples = batch_positions(self.step, num_workers, per_rank_batch)
        if self.reader_pending is None:
            self.reader_pending = [[] for _ in self.reader_samples]

    def consumed(self, batch: dict[str, Any]) -> None:
        """Batch ``step`` came from reader ``step % readers`` (round-robin); CPU tensors."""
        reader = self.step % len(self.reader_samples)
        self.reader_samples[reader] = int(batch["consumed"])
        self.reader_pending[reader] = batch["pending"].tolist()


class CheckpointManager:
    """Saves every ``every_steps`` steps (0: only when asked) and at the end; resumes."""

    def __init__(self, path: Path, *, every_steps: int, dist: DistInfo, batch_size: int,
                 num_workers: int) -> None:  # fmt: skip
        self.path, self.every_steps, self.dist = Path(path), every_steps, dist
        self.batch_size, self.num_workers = batch_size, num_workers

    def due(self, step: int, done: bool) -> bool:
        return done or bool(self.every_steps and step % self.every_steps == 0)

    def save(self, model: nn.Module, method: nn.Module, optim: Optimization, state: TrainState):
        """Every rank calls it (their reader positions are gathered); the main process writes."""
        positions = distributed.all_gather_object((state.reader_samples, state.reader_pending))
        if self.dist.is_main:
            payload = {
                "model": model.state_dict(), "method": method.state_dict(), **optim.state_dict(),
                "step": state.step, "samples_seen": state.step * self.batch_size,
                "corrupt_samples": state.corrupt_samples,
                "duplicate_images": state.duplicate_images,
                "data_position": {
                    "batches_consumed": state.step,
                    "reader_samples": [samples for samples, _ in positions],
                    "reader_pending": [pending for _, pending in positions],
                },
                "rng": checkpoint.rng_state(), "world_size": self.dist.world_size,
                "batch_size": self.batch_size,
            }  # fmt: skip
            checkpoint.save(self.path, payload)
        distributed.barrier()

    def restore(self, model: nn.Module, method: nn.Module, optim: Optimization) -> TrainState:
        saved = checkpoint.load(self.path, map_location=self.dist.device)
        # another world size splits the data across ranks differently: not the same run either
        for key, now in (("batch_size", self.batch_size), ("world_size", self.dist.world_size)):
            if saved.get(key) != now:
                raise CheckpointError(
                    f"{self.path}: saved with {key}={saved.get(key)}, this run has {key}={now}"
                )
        checkpoint.load_state_strict(model, saved["model"], "model")
        checkpoint.load_state_strict(method, saved["method"], "method state")
        optim.load_state_dict(saved)
        checkpoint.set_rng_state(saved["rng"])
        position = saved.get("data_position", {})
        readers, pending = position.get("reader_samples"), position.get("reader_pending")
        mine = readers[self.dist.rank] if readers else None
        # another worker count deals the shards to readers differently: its positions mean
        # nothing here, so it skips by batches, as an older checkpoint without them does
        if mine is not None and len(mine) != loader_readers(self.num_workers):
            mine = None
        return TrainState(
            step=saved["step"], corrupt_samples=saved.get("corrupt_samples", 0),
            duplicate_images=saved.get("duplicate_images", 0), reader_samples=mine,
            reader_pending=pending[self.dist.rank] if mine is not None and pending else None,
        )  # fmt: skip
