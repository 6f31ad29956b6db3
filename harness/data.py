"""Reading a manifest's shards with webdataset: decode, augment, tokenize, batch.

Order and splitting. Each epoch the shard list is shuffled with (seed, epoch) and dealt out to
the ``world_size * num_workers`` reader slots (rank-major), so every sample is read exactly once
per epoch across all ranks and workers. With fewer shards than slots, every slot reads all
shards and keeps every n-th sample instead. A slot's stream is endless (epoch after epoch), so
no rank runs dry before another; the trainer stops all ranks at the same step.

Determinism. The raw sample stream of a slot is a pure function of (seed, slot, shards): resuming
after ``skip_batches`` batches drops the right raw samples before any decoding. Per-sample
randomness (which caption, which crop) is seeded from (seed, epoch, index), so it does not depend
on worker count or on resuming.

Distinct images. The shuffle buffer is drained at each epoch's end, so it never mixes two
epochs, and a sample whose image is already in the batch being filled (possible only in the
batch that spans an epoch boundary) waits for the next batch: no training batch of a rank holds
an image twice, and every sample is still read once per epoch. A resumed reader keeps the
samples that were waiting at its checkpoint (``skip_pending``).

Corrupt samples (undecodable image, no caption) are skipped and counted; each batch reports how
many its reader skipped since its previous batch in ``batch["corrupt"]``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gin
import numpy as np
import open_clip
import pyspng
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness import stopping
from harness.manifest import DataError, Manifest, check_shards, load_manifest

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does
_UNLABELLED = object()  # a valid sample the reader was asked to pass over (not corrupt)


@gin.configurable
@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is read. ``manifest=None`` means the built-in dataset."""

    manifest: str | None = None
    augment: str = "open_clip"  # "open_clip" (RandomResizedCrop 0.9-1.0) or "none"
    num_workers: int = 1
    shuffle_buffer: int = 2000
    verify_checksums: bool = True
    builtin_root: str = "data"
    # Loader workers run at this nice value: on a machine with few cores they then take the CPU
    # the training step leaves idle instead of slowing its forward (0 keeps the parent's).
    worker_nice: int = 19

    def __post_init__(self) -> None:
        if self.augment not in ("open_clip", "none"):
            raise ValueError(f"DataConfig.augment={self.augment!r}; choose 'open_clip' or 'none'")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers={self.num_workers} must be >= 0")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"DataConfig.worker_nice={self.worker_nice} must be in 0..19")


def resolve_manifest(config: DataConfig) -> Manifest:
    """Load the configured manifest, building the built-in dataset on first use."""
    if config.manifest is None:
        from data_tools.builtin import BuiltinSpec, build, default_dir

        spec = BuiltinSpec()
        path = build(spec, default_dir(spec, config.builtin_root))
    else:
        path = Path(config.manifest)
    manifest = load_manifest(path)
    check_shards(manifest, checksums=config.verify_checksums)
    return manifest


# ---------------------------------------------------------------- per-sample helpers


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """Captions, index and labels of a raw sample, whatever caption layout it uses."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caps = meta.get("captions")
    if caps is None and "caption" in meta:
        caps = [meta["caption"]]
    if caps is None and "txt" in sample:
        caps = [sample["txt"].decode("utf-8")]
    caps = [c.strip() for c in (caps or []) if isinstance(c, str) and c.strip()]
    return {"captions": caps, "index": meta.get("index"), "labels": meta.get("labels", {})}


def random_resized_box(
    width: int, height: int, rng: random.Random, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)
):
    """Crop box of RandomResizedCrop (open_clip's train augmentation), drawn from ``rng``.

    Drawing from a per-sample Python RNG instead of torch's global one keeps augmentation
    independent of worker count and resuming, and avoids torch.manual_seed per sample.
    """
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    side = min(width, height)  # fallback: central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def to_pixels(image: Image.Image, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop ``box`` and resize to size x size in one resampling step; uint8 HWC."""
    if box == (0, 0, size, size) and image.size == (size, size):
        return np.asarray(image)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def _decode_rgb8_png(data: bytes) -> Image.Image | None:
    """An 8-bit RGB PNG decoded by libspng (pyspng), or None for anything else.

    PNG is lossless, so both decoders give the same pixels; libspng skips Pillow's Python-level
    chunk handling: 25 instead of 42 us per 48x48 image on a 2-core CPU. Other PNG kinds, other
    formats and whatever libspng refuses go to Pillow as before.
    """
    if data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":  # bit depth 8, colour type RGB
        return None
    try:
        pixels = pyspng.load(data)
    except RuntimeError:
        return None
    height, width, _ = pixels.shape
    return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for key in IMAGE_KEYS:
        if key in sample:
            fast = _decode_rgb8_png(sample[key])
            if fast is not None:
                return fast
            img = Image.open(io.BytesIO(sample[key]))
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")


class Tokenizer(open_clip.tokenizer.SimpleTokenizer):
    """open_clip's CLIP BPE tokenizer, giving the same ids in about half the time.

    Three shortcuts, each exact (a test compares with open_clip on random text):
    - the ids of a word (byte-level mapping, BPE merges, vocabulary lookup: a pure function of
      the word) are computed once per word instead of once per occurrence;
    - printable ASCII text without ``&`` skips ftfy and HTML unescaping, which leave such text
      unchanged (ftfy mends mojibake, control characters and Unicode forms; unescaping needs
      ``&``), and goes straight to whitespace folding and lower-casing;
    - the batch is filled through numpy instead of one small tensor per caption.
    Together: 10 instead of 35 us per built-in caption (2-core CPU).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.reduction_fn is not None or self.clean_fn is not open_clip.tokenizer._clean_lower:
            raise ValueError("Tokenizer supports open_clip's default clean='lower', no reduction")
        self._word_ids: dict[str, list[int]] = {}

    def _clean(self, text: str) -> str:
        if text.isascii() and text.isprintable() and "&" not in text:
            return " ".join(text.split()).lower()
        return self.clean_fn(text)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.pat.findall(self._clean(text)):
            cached = self._word_ids.get(word)
            if cached is None:
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                cached = [self.encoder[piece] for piece in self.bpe(mapped).split(" ")]
                self._word_ids[word] = cached
            ids.extend(cached)
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Ids padded with zeros to ``context_length``; a longer text is cut and ends in EOT."""
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in zip(out, texts, strict=True):
            ids = [self.sot_token_id, *self.encode(text)][: length - 1]
            ids.append(self.eot_token_id)
            row[: len(ids)] = ids
        return torch.from_numpy(out)


class PlainUstarMembers:
    """(name, data offset, size) of the leading plain members of a tar archive in ``data``.

    Python's tarfile parses every header field in Python: 37 us per sample (two members) on the
    built-in shards on a 2-core CPU, against 8 us here, where only name, size, type and checksum
    are read. Only the simplest case is handled: a POSIX or GNU ustar header of a regular file
    with an octal size and a valid unsigned checksum. Iteration stops at the first header that
    is anything else, leaving ``offset`` at it for tarfile to carry on from, or with ``at_end``
    set at the zero block that ends an archive.
    """

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data, self.offset, self.at_end = data, 0, False

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        block = tarfile.BLOCKSIZE
        while True:
            header = self.data[self.offset : self.offset + block]
            if len(header) < block:
                return
            if header.count(0) == block:
                self.at_end = True
                return
            member = _plain_header(header)
            if member is None:
                return
            name, size = member
            yield name, self.offset + block, size
            self.offset += block + -(-size // block) * block


_POSIX_MAGIC, _GNU_MAGIC = b"ustar\x0000", b"ustar  \x00"


def _plain_header(header: bytes) -> tuple[str, int] | None:
    """Name and size of a plain regular-file ustar header, or None for anything else."""
    magic = header[257:265]
    if header[156:157] not in (b"0", b"\0") or magic not in (_POSIX_MAGIC, _GNU_MAGIC):
        return None
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256 numbers, garbage
        return None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # its own field as spaces
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if magic == _POSIX_MAGIC else b""
    if prefix:
        name = prefix + b"/" + name
    if not name or name.endswith(b"/"):  # an old-style directory
        return None
    return name.decode("utf-8", "surrogateescape"), size


def _member_spans(file: Any, data: mmap.mmap, url: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of the tar archive open as ``file`` and
    mapped as ``data``: plain ustar members first, then tarfile from the first other header."""
    plain = PlainUstarMembers(data)
    yield from plain
    if plain.at_end:
        return
    file.seek(plain.offset)  # tarfile counts offsets from where the file stands
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, member.offset_data, member.size
        # tarfile stops quietly at a cut or garbled header; a whole archive ends in zeros
        end_block = data[tar.offset : tar.offset + tarfile.BLOCKSIZE]
        if len(end_block) < tarfile.BLOCKSIZE or any(end_block):
            raise tarfile.ReadError(f"{url} is cut or garbled at byte {tar.offset}")


# ---------------------------------------------------------------- the stream


def loader_readers(num_workers: int) -> int:
    """Readers of one rank's stream: one per DataLoader worker, or one in-process (0 workers)."""
    return max(1, num_workers)


def smallest_reader_epoch(manifest: Manifest, readers: int) -> int:
    """The fewest training samples any of ``readers`` reader slots gets in an epoch: a slot is
    dealt whole shards (at least the smallest floor(shards / readers) of them) or, with fewer
    shards than slots, every ``readers``-th sample."""
    sizes = sorted(s.num_samples for s in manifest.split("train").shards)
    if len(sizes) >= readers:
        return sum(sizes[: len(sizes) // readers])
    return sum(sizes) // readers


def batch_positions(batches: int, num_workers: int, batch_size: int) -> list[int]:
    """Samples each reader role has consumed after ``batches`` global batches, counting only
    full batches: exact unless some were corrupt. Batches are dealt round-robin over roles."""
    readers = loader_readers(num_workers)
    return [
        (batches // readers + (1 if role < batches % readers else 0)) * batch_size
        for role in range(readers)
    ]


class ShardStream(IterableDataset):
    """Batches from one split, for one rank, split over this rank's DataLoader workers."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        context_length: int,
        train: bool,
        augment: str = "none",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        shuffle_buffer: int = 0,
        epochs: int | None = None,
        skip_batches: int = 0,
        skip_samples: list[int] | None = None,
        skip_pending: list[list[int]] | None = None,
        label_tasks: list[str] = (),
        labelled_only: bool = False,
    ) -> None:
        self.shards = manifest.shard_paths(split)
        self.first_index = {
            p: s.first_index for p, s in zip(self.shards, manifest.split(split).shards, strict=True)
        }
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = loader_readers(num_workers)
        self.shuffle_buffer, self.epochs, self.skip_batches = shuffle_buffer, epochs, skip_batches
        # per reader role: samples of its stream already consumed (resume). Without it the skip
        # is skip_batches' share x batch_size, short by the corrupt samples those batches skipped
        if skip_samples is not None and len(skip_samples) != self.num_workers:
            raise ValueError(
                f"skip_samples has {len(skip_samples)} readers, not {self.num_workers}"
            )
        self.skip_samples = skip_samples
        self.skip_pending = skip_pending  # per reader role: positions consumed, in no batch yet
        self.label_tasks = list(label_tasks)
        self.labelled_only = labelled_only  # skip, before decoding, samples with no task label
        self.broken = 0  # tar-level errors seen by this reader (per worker copy)
        self.image_size = image_size
        self.augment = train and augment == "open_clip"
        self.tokenizer = Tokenizer(context_length=context_length)

    # -- raw samples -------------------------------------------------
    def _logical_worker(self) -> int:
        """The reader role this DataLoader worker plays.

        The DataLoader hands out batches round-robin starting at worker 0. After resuming at
        batch ``skip``, the next batch belongs to role ``skip % n``, so physical worker w plays
        role (w + skip) % n: the resumed batch order equals the uninterrupted one.
        """
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return (physical + self.skip_batches) % self.num_workers

    def _slot(self) -> tuple[int, int]:
        return (
            self.rank * self.num_workers + self._logical_worker(),
            self.world_size * self.num_workers,
        )

    def _epoch_shards(self, epoch: int, slot: int, n_slots: int) -> tuple[list[str], int]:
        order = list(self.shards)
        if self.train:
            random.Random(_seed(self.seed, "shards", epoch)).shuffle(order)
        if len(order) >= n_slots:
            return order[slot::n_slots], 1
        return order, n_slots  # too few shards: keep every n-th sample instead

    def _raw(self) -> Iterator[dict[str, Any]]:
        slot, n_slots = self._slot()
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            shards, stride = self._epoch_shards(epoch, slot, n_slots)
            position = -1
            for url in shards:
                samples = wds.tariterators.group_by_keys(self._tar_members(url))
                for ordinal, sample in enumerate(samples):
                    position += 1
                    if stride > 1 and position % stride != slot:
                        continue
                    sample["__epoch__"], sample["__ordinal__"] = epoch, ordinal
                    yield sample
            epoch += 1

    def _tar_members(self, url: str) -> Iterator[dict[str, Any]]:
        """The regular files of one shard, in order, as webdataset's ``group_by_keys`` takes them.

        Each member's bytes are sliced from a memory map. Plain ustar members (what webdataset's
        ``TarWriter`` and Python's tarfile write for short names) have their headers read by
        ``PlainUstarMembers``; from the first header that is anything else (pax or GNU
        extensions, a directory, damage) tarfile's random-access reader takes over.
        A truncated or garbled shard ends there and counts once in ``broken``; the samples
        before the damage are kept.
        """
        try:
            with (
                open(url, "rb") as file,
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
            ):
                for name, start, size in _member_spans(file, data, url):
                    if not WDS_META.match(name):  # a cut member comes out short: undecodable
                        yield {"fname": name, "data": data[start : start + size], "__url__": url}
        except (tarfile.TarError, EOFError, OSError, ValueError):  # ValueError: an empty file
            self.broken += 1

    def _shuffled(self, raw: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The reader's samples through a shuffle buffer that never mixes two epochs: the
        buffer is drained at each epoch's end, so an epoch's samples all come out before the
        next epoch's first (a batch can then span at most one epoch boundary)."""
        if not self.train or self.shuffle_buffer <= 1:
            yield from raw
            return
        slot, _ = self._slot()
        rng = random.Random(_seed(self.seed, "buffer", slot))
        buffer: list[dict[str, Any]] = []
        for sample in raw:
            if buffer and sample["__epoch__"] != buffer[0]["__epoch__"]:
                rng.shuffle(buffer)
                yield from buffer
                buffer = []
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _resume_point(self) -> tuple[int, set[int]]:
        """(samples of this reader's stream to pass over, positions among them to keep: the
        ones consumed but waiting for a batch when the checkpoint was taken)."""
        role = self._logical_worker()
        if self.skip_samples is None:
            return batch_positions(self.skip_batches, self.num_workers, self.batch_size)[
                role
            ], set()
        waiting = self.skip_pending[role] if self.skip_pending is not None else []
        return self.skip_samples[role], set(waiting)

    # -- decoded samples and batches ---------------------------------
    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        try:
            meta = sample_meta(sample)
            if not meta["captions"]:
                return None
            if self.labelled_only and not any(t in meta["labels"] for t in self.label_tasks):
                return _UNLABELLED
            image = decode_image(sample)
        except Exception:  # a broken sample must not stop a run: counted and skipped
            return None
        index = meta["index"]
        if index is None:
            index = self.first_index[sample["__url__"]] + sample["__ordinal__"]
        if self.train:
            rng = random.Random(_seed(self.seed, "sample", sample["__epoch__"], index))
            captions = [rng.choice(meta["captions"])]
        else:
            captions = meta["captions"]
        box = random_resized_box(*image.size, rng) if self.augment else center_box(*image.size)
        labels = [int(meta["labels"].get(t, -1)) for t in self.label_tasks]
        pixels = to_pixels(image, self.image_size, box)
        return {"image": pixels, "captions": captions, "index": index, "labels": labels}

    def _collate(
        self, items: list[dict[str, Any]], corrupt: int, consumed: int, pending: list[int]
    ) -> dict[str, torch.Tensor]:
        """One batch; ``consumed``: samples of this reader's stream through this batch (what a
        resumed reader skips: ``skip_samples``), ``pending``: the positions among them that are
        in no batch yet (what it keeps: ``skip_pending``)."""
        owners = [i for i, item in enumerate(items) for _ in item["captions"]]
        flat = [c for item in items for c in item["captions"]]
        batch = {
            # uint8 NCHW: normalised on the device by prepare_batch (4x less to copy)
            "image": torch.from_numpy(self._stack_pixels(items)).permute(0, 3, 1, 2),
            "text": self.tokenizer(flat),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "corrupt": torch.tensor(corrupt, dtype=torch.long),
            "consumed": torch.tensor(consumed, dtype=torch.long),
            "pending": torch.tensor(pending, dtype=torch.long),
        }
        if not self.train:  # evaluation keeps every caption and who owns it
            batch["caption_owner"] = torch.tensor(owners, dtype=torch.long)
            batch["labels"] = torch.tensor(
                [item["labels"] for item in items], dtype=torch.long
            ).reshape(len(items), len(self.label_tasks))
        return in_one_storage(batch)

    def _stack_pixels(self, items: list[dict[str, Any]]) -> np.ndarray:
        if not items:  # a finite stream's last batch may hold only a count of corrupt samples
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return np.stack([item["image"] for item in items])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = enumerate(
            self._shuffled(self._raw())
        )  # (position in this reader's stream, sample)
        skip, keep = self._resume_point()
        batcher = DistinctBatcher(self.batch_size, distinct=self.train)
        for position, sample in itertools.islice(stream, skip):
            if position in keep:  # consumed before the checkpoint, still waiting for a batch
                batcher.offer(position, self._decode(sample))
        consumed = skip  # samples of this reader's stream, skipped ones included
        corrupt = 0
        for position, sample in stream:
            consumed = position + 1
            item = self._decode(sample)
            if item is _UNLABELLED:
                continue
            if item is None:
                corrupt += 1
                continue
            batcher.offer(position, item)
            while batcher.full:
                items = batcher.pop()
                yield self._collate(items, corrupt + self.broken, consumed, batcher.pending())
                corrupt, self.broken = 0, 0
        # only a finite stream (evaluation, tests) ever ends; a last batch of nothing but
        # corrupt samples still carries their count (with no images)
        if batcher.items or corrupt + self.broken:
            yield self._collate(batcher.pop(), corrupt + self.broken, consumed, batcher.pending())


class DistinctBatcher:
    """Fills a batch with samples of distinct images, in stream order.

    A sample whose image (stable index) is already in the batch being filled waits, in order,
    for the next batch: every sample is still used once per epoch, and no batch holds an image
    twice (each a false negative for a contrastive loss). With the epoch-bounded shuffle this
    only happens in the batch that spans an epoch boundary. ``distinct=False`` (evaluation)
    keeps every sample where it comes.
    """

    def __init__(self, size: int, *, distinct: bool) -> None:
        self.size, self.distinct = size, distinct
        self.items: list[dict[str, Any]] = []
        self._positions: list[int] = []
        self._indices: set[int] = set()
        self._waiting: list[tuple[int, dict[str, Any]]] = []

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    def offer(self, position: int, item: dict[str, Any]) -> None:
        if self.distinct and item["index"] in self._indices:
            self._waiting.append((position, item))
            if len(self._waiting) > self.size:
                raise DataError(
                    f"a loader reader found more than {self.size} samples whose image is "
                    "already in the batch: an epoch of one reader holds fewer distinct "
                    "readable images than a batch; lower the batch or DataConfig.num_workers"
                )
            return
        self.items.append(item)
        self._positions.append(position)
        self._indices.add(item["index"])

    def pop(self) -> list[dict[str, Any]]:
        """The batch filled so far; the waiting samples start the next one."""
        batch, waiting = self.items, self._waiting
        self.items, self._positions, self._indices, self._waiting = [], [], set(), []
        for position, item in waiting:
            self.offer(position, item)
        return batch

    def pending(self) -> list[int]:
        """Stream positions consumed but in no batch yet, in stream order: offered again in
        that order, they rebuild this state (what a resumed reader does)."""
        return sorted([*self._positions, *(position for position, _ in self._waiting)])


def in_one_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, contiguous, as views of one byte buffer.

    A loader worker hands each batch to the training process through shared memory, and every
    storage costs the training process a socket round trip to the worker for its file
    descriptor (the worker runs at low priority, so it can wait its turn). Pickle sends a
    storage shared by several views once: one round trip per batch instead of one per tensor.
    Measured on 2 CPU cores at batch 32 (bench.throughput, clip, 3 interleaved rounds): step
    median 51.1-54.9 -> 49.4-51.8 ms, loader alone 3,441-3,450 -> 3,803-4,190 samples/s.
    """
    align = 64  # any dtype's view needs its offset to be a multiple of its item size
    offsets, size = {}, 0
    for name, t in tensors.items():
        offsets[name] = size
        size += -(-t.nbytes // align) * align
    buffer = torch.empty(size, dtype=torch.uint8)
    packed = {}
    for name, t in tensors.items():
        view = buffer[offsets[name] : offsets[name] + t.nbytes].view(t.dtype).view(t.shape)
        packed[name] = view.copy_(t)
    return packed


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
