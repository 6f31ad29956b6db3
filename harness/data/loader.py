"""Loaders: the dataset a run names (the built-in one built on first use), DataLoaders over
``ShardStream`` for training and evaluation, and batches moved to the device."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch.utils.data import DataLoader

from harness import stopping
from harness.data.stream import ShardStream
from harness.manifest import Manifest, check_shards, load_manifest
from harness.specs import DataConfig


def resolve_manifest(config: DataConfig, *, checksums: bool | None = None) -> Manifest:
    """Load the configured manifest, building the built-in dataset on first use; shard
    checksums are verified as ``DataConfig.verify_checksums`` says, unless ``checksums`` does."""
    if config.manifest is None:
        from data_tools.builtin import BuiltinSpec, build, default_dir

        spec = BuiltinSpec()
        path = build(spec, default_dir(spec, config.builtin_root))
    else:
        path = Path(config.manifest)
    manifest = load_manifest(path)
    check_shards(manifest, checksums=config.verify_checksums if checksums is None else checksums)
    return manifest


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel mean and std (0-255 scale) on ``device``, copied there once: a copy per step
    would make the host wait for the GPU."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255
    return mean.to(device), std.to(device)


def prepare_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a loader batch to ``device`` and turn uint8 images into normalised float images."""
    out = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    mean, std = _normalisation(device)
    out["image"] = (out["image"].float() - mean) / std
    return out


def make_loader(
    stream: ShardStream, num_workers: int, worker_nice: int = 0, pin_memory: bool | None = None
) -> DataLoader:
    """One DataLoader per stream; batches are already assembled inside the workers.

    ``pin_memory`` defaults to whether CUDA is there (page-locked batches copy to it faster).
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=functools.partial(_init_worker, worker_nice),
    )


def _init_worker(nice: int, worker_id: int) -> None:
    stopping.ignore_in_worker()  # a signal to the whole group: the trainer checkpoints first
    if nice:
        os.nice(nice)  # an increment on the parent's niceness (capped at 19 by the kernel)


def train_loader(
    manifest: Manifest,
    config: DataConfig,
    *,
    per_rank_batch: int,
    image_size: int,
    context_length: int,
    seed: int,
    rank: int,
    world_size: int,
    skip_batches: int = 0,
    skip_samples: list[int] | None = None,
    skip_pending: list[list[int]] | None = None,
) -> DataLoader:
    stream = ShardStream(
        manifest,
        "train",
        batch_size=per_rank_batch,
        image_size=image_size,
        context_length=context_length,
        train=True,
        augment=config.augment,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=config.num_workers,
        shuffle_buffer=config.shuffle_buffer,
        skip_batches=skip_batches,
        skip_samples=skip_samples,
        skip_pending=skip_pending,
    )
    return make_loader(stream, config.num_workers, config.worker_nice)


def eval_loader(
    manifest: Manifest,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    context_length: int,
    num_workers: int = 1,
    labelled_only: bool = False,
) -> DataLoader:
    """Every sample of ``split`` once, in shard order, with all captions and labels."""
    stream = ShardStream(
        manifest,
        split,
        batch_size=batch_size,
        image_size=image_size,
        context_length=context_length,
        train=False,
        num_workers=1,
        epochs=1,
        label_tasks=[t.name for t in manifest.label_tasks],
        labelled_only=labelled_only,
    )
    return make_loader(stream, min(num_workers, 1))
