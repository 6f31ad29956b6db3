"""The shard writer every converter shares: records in, WebDataset shards + ``manifest.json`` out.

A converter only reads its input format and yields :class:`Record` s (one image path, one raw
caption, optionally a split and labels). Everything else happens here, the same way for every
source:

1. Captions are cleaned (:func:`clean_caption`: strip, collapse whitespace); a caption that is
   empty afterwards is skipped and reported. Records are grouped by image (``Record.source``), so
   all captions of an image end up in ONE sample, as the retrieval protocol needs.
2. Images that do not exist are reported as ``missing file``.
3. Splits are strictly by image. Records that carry a split keep it; the others are ranked by
   ``sha256(seed, source)`` and the first ``test_size`` (default ``max(1, round(0.2 * n))``) go to test.
   Ranking by a per-image hash is independent of input order and gives exact counts (5,000 COCO
   val2017 images -> 4,000 train / 1,000 test).
4. Each split is ordered by the same rank (so shards mix sources rather than follow one folder),
   numbered 0..n-1 (the sample's stable ``index``) and cut into shards of ``shard_size`` images.
5. Shards are written in parallel (one process per shard, ``workers`` at a time). Each image is
   fully decoded with Pillow; an unreadable one is skipped and reported. Readable images are
   stored as their original bytes under their original extension, or re-encoded when resized
   (``image_size``: shorter side down to N) or when their format is not one the reader takes.
6. A shard is written to a temporary file and renamed, then a record of it (plan fingerprint,
   sample count, sha256) goes to ``.done/<shard>.json``. On a rerun a shard whose record matches
   the new plan and whose bytes still match their sha256 is kept, so an interrupted conversion
   resumes where it stopped and a finished one costs only the checksums.

A sample is ``{"__key__": "%08d" % index, <ext>: image bytes, "json": {"index", "captions",
"source"[, "labels"]}}``; tars use fixed metadata, so the same input gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from harness.errors import report_errors
from harness.files import sha256_file, writable_dir, write_json_atomic
from harness.manifest import DataError, LabelTask, Manifest, ShardInfo, SplitInfo, save_manifest

WRITER_VERSION = 1  # bump whenever the bytes written for the same plan change
DONE_DIR = ".done"
SPLIT_ORDER = ("train", "test")  # manifest order; other split names (e.g. "val") follow sorted
STORED_AS_IS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpeg", ".webp": "webp"}
IMAGE_SUFFIXES = (*STORED_AS_IS, ".bmp", ".gif", ".tif", ".tiff")
JPEG_QUALITY = 90

T = TypeVar("T")
R = TypeVar("R")


# ---------------------------------------------------------------- records and items


@dataclass(frozen=True)
class Record:
    """One (image, caption) pair as a converter read it."""

    source: str  # the image's name as the user gave it: grouping key and ``source`` in the json
    path: str  # where the image is read from
    caption: Any  # raw caption, cleaned here
    split: str | None = None  # None: assigned by the seeded split
    origin: str = ""  # where the caption came from, for messages ("pairs.csv line 7")
    labels: Mapping[str, int] | None = None


@dataclass
class Item:
    """One image with all its captions: one sample."""

    source: str
    path: str
    captions: list[str]
    split: str | None
    labels: dict[str, int] = field(default_factory=dict)
    index: int = -1


def clean_caption(text: Any) -> str:
    """Strip and collapse every run of whitespace (newlines and tabs too) to one space."""
    return " ".join(str(text).split()) if text is not None else ""


def skip(source: str, reason: str) -> dict[str, str]:
    """An entry of the manifest's ``skipped`` list."""
    return {"source": source, "reason": reason}


def group_records(records: Iterable[Record]) -> tuple[list[Item], list[dict[str, str]]]:
    """Items in order of first appearance; empty captions and caption-less images reported."""
    items: dict[str, Item] = {}
    skipped = []
    for r in records:
        item = items.get(r.source)
        if item is None:
            item = items[r.source] = Item(r.source, r.path, [], r.split, dict(r.labels or {}))
        elif r.split != item.split:
            raise DataError(
                f"{r.origin}: image {r.source!r} is in split {r.split!r} here but in "
                f"{item.split!r} on an earlier row; an image must be in one split only"
            )
        text = clean_caption(r.caption)
        if text:
            item.captions.append(text)
        else:
            skipped.append(skip(r.source, f"empty caption ({r.origin})"))
    kept = [i for i in items.values() if i.captions]
    skipped += [skip(i.source, "no non-empty caption") for i in items.values() if not i.captions]
    return kept, skipped


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class WriterOptions:
    out: Path
    name: str | None = None
    shard_size: int = 1000
    image_size: int | None = None  # shorter side down to this; None keeps the original bytes
    workers: int = 2
    seed: int = 0
    test_fraction: float = 0.2
    test_size: int | None = None  # exact number of test images; overrides test_fraction
    progress: bool = True

    def __post_init__(self) -> None:
        for flag, value in (("--shard-size", self.shard_size), ("--workers", self.workers)):
            if value < 1:
                raise DataError(f"{flag} is {value}; it must be at least 1")
        if self.image_size is not None and self.image_size < 8:
            raise DataError(f"--image-size is {self.image_size}; it must be at least 8")
        if not 0 < self.test_fraction < 1:  # the harness evaluates on "test": it must exist
            raise DataError(f"--test-fraction is {self.test_fraction}; it must be in (0, 1)")
        if self.test_size is not None and self.test_size < 1:
            raise DataError(f"--test-size is {self.test_size}; it must be at least 1")
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out} exists and is not a folder")


def add_writer_args(parser: argparse.ArgumentParser) -> None:
    """The output options every converter takes."""
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="output folder (shards + manifest.json)")
    g.add_argument(
        "--name", default=None, help="dataset name in the manifest (default: --out name)"
    )
    g.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    g.add_argument(
        "--image-size", type=int, default=None, metavar="N",
        help="resize so the shorter side is at most N (keeps aspect; default: original bytes)",
    )  # fmt: skip
    g.add_argument("--workers", type=int, default=2, help="parallel shard writers (default 2)")
    g.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    test = g.add_mutually_exclusive_group()
    test.add_argument(
        "--test-fraction", type=float, default=0.2,
        help="share of images in the test split when the input gives no split (default 0.2)",
    )  # fmt: skip
    test.add_argument("--test-size", type=int, default=None, help="exact number of test images")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def writer_options(args: argparse.Namespace) -> WriterOptions:
    return WriterOptions(
        out=args.out,
        name=args.name,
        shard_size=args.shard_size,
        image_size=args.image_size,
        workers=args.workers,
        seed=args.seed,
        test_fraction=args.test_fraction,
        test_size=args.test_size,
        progress=not args.no_progress,
    )


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line as JSON-able provenance for the manifest."""

    def plain(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return {k: plain(v) for k, v in sorted(vars(args).items())}


# ---------------------------------------------------------------- splits and shard plan


def _rank(seed: int, source: str) -> bytes:
    return hashlib.sha256(f"{seed}/{source}".encode()).digest()


def assign_splits(items: list[Item], options: WriterOptions) -> None:
    """Give every item without a split one: the first ``test_size`` by seeded rank are test."""
    free = sorted(
        (i for i in items if i.split is None), key=lambda i: _rank(options.seed, i.source)
    )
    if not free:
        return
    n_test = options.test_size
    if n_test is None:
        n_test = max(1, round(options.test_fraction * len(free)))
    if n_test >= len(free):
        raise DataError(
            f"a test split of {n_test} leaves no training images: only {len(free)} usable images"
        )
    for k, item in enumerate(free):
        item.split = "test" if k < n_test else "train"


@dataclass(frozen=True)
class ShardJob:
    name: str  # file name, e.g. train-000003.tar
    split: str
    out: str
    items: list[Item]
    image_size: int | None


@dataclass(frozen=True)
class ShardResult:
    name: str
    split: str
    num_samples: int
    sha256: str
    first_index: int
    skipped: list[dict[str, str]]
    reused: bool = False


def split_names(names: Iterable[str | None]) -> list[str]:
    """The distinct split names: train, test, then any others sorted."""
    present = {n for n in names if n is not None}
    return [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))


def plan_shards(items: list[Item], options: WriterOptions) -> list[ShardJob]:
    """Order each split by seeded rank, number its images and cut it into shards."""
    jobs = []
    for split in split_names(i.split for i in items):
        members = sorted(
            (i for i in items if i.split == split), key=lambda i: _rank(options.seed, i.source)
        )
        for index, item in enumerate(members):
            item.index = index
        for k, start in enumerate(range(0, len(members), options.shard_size)):
            chunk = members[start : start + options.shard_size]
            jobs.append(
                ShardJob(f"{split}-{k:06d}.tar", split, str(options.out), chunk, options.image_size)
            )
    return jobs


def plan_fingerprint(job: ShardJob) -> str:
    """Everything a shard's bytes depend on, including each image file's size and mtime."""

    def stat(path: str) -> tuple[int, int]:
        try:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1

    payload = {
        "version": WRITER_VERSION,
        "image_size": job.image_size,
        "items": [
            # absolute, so a rerun from another folder still recognises the same images
            [i.index, i.source, os.path.abspath(i.path), i.captions, i.labels, *stat(i.path)]
            for i in job.items
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- one shard (in a worker)


def load_image(path: str, image_size: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of a readable image; raises on anything Pillow cannot fully decode."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # a full decode: a truncated file fails here, not later in training
        ext = STORED_AS_IS.get(Path(path).suffix.lower())
        too_big = image_size is not None and min(img.size) > image_size
        if ext is not None and not too_big:
            return ext, data
        return reencode(img, image_size if too_big else None)


def reencode(img: Image.Image, image_size: int | None) -> tuple[str, bytes]:
    """Shorter side to ``image_size`` (never up); JPEG sources stay JPEG, the rest become PNG."""
    as_jpeg = img.format in ("JPEG", "MPO", "WEBP")
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # the reader converts to RGB anyway
    if image_size is not None:
        w, h = img.size
        scale = image_size / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if as_jpeg:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG", compress_level=6)
    return "png", buf.getvalue()


def unreadable_reason(e: Exception) -> str:
    """A reason without memory addresses, so the manifest stays byte-identical across runs."""
    if isinstance(e, UnidentifiedImageError):
        return "cannot decode image (not a format Pillow recognises)"
    return f"cannot read image ({type(e).__name__}: {e})"


def encode_sample(item: Item, ext: str, data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {"index": item.index, "captions": item.captions, "source": item.source}
    if item.labels:
        meta["labels"] = item.labels
    return {"__key__": f"{item.index:08d}", ext: data, "json": json.dumps(meta).encode()}


def done_path(out: str | Path, name: str) -> Path:
    return Path(out) / DONE_DIR / f"{name}.json"


def finished(job: ShardJob, plan: str) -> ShardResult | None:
    """The recorded result of this shard if it was written from this very plan and is intact."""
    record, shard = done_path(job.out, job.name), Path(job.out) / job.name
    try:
        done = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("plan") != plan or not shard.exists() or sha256_file(shard) != done.get("sha256"):
        return None
    fields = {k: done[k] for k in ShardResult.__dataclass_fields__ if k in done}
    return ShardResult(**{**fields, "reused": True})


def write_shard(job: ShardJob) -> ShardResult:
    """Write (or keep) one shard; an unreadable image is reported, never fatal."""
    plan = plan_fingerprint(job)
    if (kept := finished(job, plan)) is not None:
        return kept
    final = Path(job.out) / job.name
    tmp = final.with_name(f".{job.name}.partial")
    skipped, count = [], 0
    # an int mtime: with a float, tarfile adds a pax header to every member and reading is 2x slower
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0) as sink:
        for item in job.items:
            try:
                ext, data = load_image(item.path, job.image_size)
            except Exception as e:  # any decoder failure: skip and report, the rest goes on
                skipped.append(skip(item.source, unreadable_reason(e)))
                continue
            sink.write(encode_sample(item, ext, data))
            count += 1
    os.replace(tmp, final)
    first = job.items[0].index if job.items else 0
    result = ShardResult(job.name, job.split, count, sha256_file(final), first, skipped)
    write_json_atomic(done_path(job.out, job.name), {"plan": plan, **asdict(result)})
    return result


# ---------------------------------------------------------------- running


def parallel_map(
    fn: Callable[[T], R], jobs: Sequence[T], *, workers: int, desc: str, progress: bool
) -> list[R]:
    """``[fn(j) for j in jobs]`` over ``workers`` processes, in order, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress, file=sys.stderr)
    with bar:
        if workers <= 1 or len(jobs) <= 1:  # no pool: cheaper, and tracebacks stay readable
            results = []
            for job in jobs:
                results.append(fn(job))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            for _ in as_completed(futures):
                bar.update()
            return [f.result() for f in futures]


def _clean_out(out: Path, keep: set[str]) -> None:
    """Remove half-written files and shards of an earlier plan that this plan no longer has."""
    for partial in out.glob(".*.partial"):
        partial.unlink()
    for record in (out / DONE_DIR).glob("*.json"):
        name = record.name.removesuffix(".json")
        if name not in keep:
            (out / name).unlink(missing_ok=True)
            record.unlink()


@dataclass(frozen=True)
class Conversion:
    manifest: Path
    written: int
    reused: int
    samples: dict[str, int]
    skipped: int


def convert(
    records: Iterable[Record],
    options: WriterOptions,
    *,
    converter: str,
    provenance: Mapping[str, Any],
    skipped: Iterable[dict[str, str]] = (),
    label_tasks: Sequence[LabelTask] = (),
) -> Conversion:
    """Group, split, write and describe a dataset; ``skipped`` adds the converter's own reports."""
    items, reported = group_records(records)
    reported = list(skipped) + reported
    exists = {i.source: os.path.isfile(i.path) for i in items}
    present = [i for i in items if exists[i.source]]
    reported += [skip(i.source, "missing file") for i in items if not exists[i.source]]
    if not present:
        raise DataError(f"{converter}: no usable image (all {len(items)} missing or captionless)")
    assign_splits(present, options)
    for split in SPLIT_ORDER:  # training and evaluation each need theirs
        if not any(i.split == split for i in present):
            raise DataError(f"{converter}: no usable image is in split {split!r}")
    jobs = plan_shards(present, options)
    writable_dir(options.out)
    _clean_out(options.out, {j.name for j in jobs})
    results = parallel_map(
        write_shard, jobs, workers=options.workers, desc=converter, progress=options.progress
    )
    reported += [entry for r in results for entry in r.skipped]
    manifest = Manifest(
        name=options.name or options.out.resolve().name,
        splits=_splits(results, converter),
        label_tasks=list(label_tasks),
        skipped=sorted(reported, key=lambda e: (e["source"], e["reason"])),
        source={
            "converter": converter,
            "writer_version": WRITER_VERSION,
            "seed": options.seed,
            **provenance,
        },
    )
    path = save_manifest(manifest, options.out)
    samples = {k: v.num_samples for k, v in manifest.splits.items()}
    reused = sum(r.reused for r in results)
    return Conversion(path, len(results) - reused, reused, samples, len(reported))


def _splits(results: list[ShardResult], converter: str) -> dict[str, SplitInfo]:
    splits: dict[str, list[ShardInfo]] = {}
    for r in results:
        if r.num_samples:  # a shard whose every image was unreadable holds nothing to read
            splits.setdefault(r.split, []).append(
                ShardInfo(r.name, r.num_samples, r.sha256, r.first_index)
            )
    for split in split_names(r.split for r in results):
        if split not in splits:
            raise DataError(f"{converter}: every image of split {split!r} was unreadable")
    return {s: SplitInfo(splits[s]) for s in split_names(splits)}


def describe(conversion: Conversion) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in conversion.samples.items())
    return (
        f"images: {counts}; shards written {conversion.written}, reused {conversion.reused}; "
        f"skipped entries {conversion.skipped} (listed under 'skipped' in the manifest)\n"
        f"{conversion.manifest}"
    )


@dataclass(frozen=True)
class Input:
    """What a converter read: records, the entries it left out itself, provenance to record."""

    records: list[Record]
    skipped: list[dict[str, str]]
    provenance: dict[str, Any] = field(default_factory=dict)


def run_converter(args: argparse.Namespace, converter: str, read: Callable[[], Input]) -> int:
    """A converter's ``main`` after parsing: check options, read the input, write, report."""
    with report_errors():
        options = writer_options(args)  # cheap checks first: bad input fails before any work
        source = read()
        result = convert(
            source.records,
            options,
            converter=converter,
            provenance={"arguments": arguments(args), **source.provenance},
            skipped=source.skipped,
        )
        print(describe(result))
    return 0
