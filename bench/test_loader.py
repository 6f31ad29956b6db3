"""pytest-benchmark micro-benchmarks of the training loader's per-sample work, one core.

    pytest bench/test_loader.py        # not part of the default run (testpaths = tests)

Each benchmark handles the same 256 training samples of the built-in dataset (built on first
use) in this process, the way a loader worker does, so a figure divided by 256 is the CPU one
worker spends per sample on that stage:

- ``read``: tar headers and webdataset's grouping into samples (``ShardStream._raw``);
- ``decode``: the PNG to RGB (``decode_image``: libspng through pyspng);
- ``crop_resize``: the augmentation's crop box resampled to the model's input (Pillow bicubic);
- ``tokenize``: one caption per sample, as a training batch draws it;
- ``sample``: everything a worker does to a read sample (caption draw, decode, box, resize);
- ``batch``: a whole batch of 256 from the stream, reading and collation included.

``decode`` + ``crop_resize`` is the part no Python-level change removes: two C calls per sample.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from harness import models
from harness.data.loader import resolve_manifest
from harness.data.samples import decode_image, random_resized_box, sample_meta, to_pixels
from harness.data.stream import ShardStream
from harness.specs import DataConfig

MODEL = "tiny-vit"
SAMPLES = 256


@pytest.fixture(scope="module")
def stream() -> ShardStream:
    """The training stream a one-worker run reads, in this process (no shuffle buffer, so a
    batch is the first samples read)."""
    cfg = models.model_config(MODEL)
    return ShardStream(
        resolve_manifest(DataConfig()),
        "train",
        batch_size=SAMPLES,
        image_size=models.image_size(cfg),
        context_length=models.context_length(cfg),
        train=True,
        augment="open_clip",
        num_workers=0,
    )


@pytest.fixture(scope="module")
def raw(stream) -> list[dict]:
    return list(itertools.islice(stream._raw(), SAMPLES))


def test_read(benchmark, stream):
    benchmark.group = f"loader, {SAMPLES} samples"
    samples = benchmark(lambda: list(itertools.islice(stream._raw(), SAMPLES)))
    assert len(samples) == SAMPLES and all("png" in s and "json" in s for s in samples)


def test_decode(benchmark, raw):
    benchmark.group = f"loader, {SAMPLES} samples"
    images = benchmark(lambda: [decode_image(s) for s in raw])
    assert all(im.mode == "RGB" for im in images)


def test_crop_resize(benchmark, raw, stream):
    images = [decode_image(s) for s in raw]
    rng = random.Random(0)
    boxes = [random_resized_box(*im.size, rng) for im in images]
    size = stream.image_size
    benchmark.group = f"loader, {SAMPLES} samples"
    pairs = list(zip(images, boxes, strict=True))
    pixels = benchmark(lambda: [to_pixels(im, size, box) for im, box in pairs])
    assert all(p.shape == (size, size, 3) and p.dtype == np.uint8 for p in pixels)


def test_tokenize(benchmark, raw, stream):
    captions = [sample_meta(s)["captions"][0] for s in raw]
    benchmark.group = f"loader, {SAMPLES} samples"
    ids = benchmark(stream.tokenizer, captions)
    assert ids.shape == (SAMPLES, stream.tokenizer.context_length) and (ids[:, 0] > 0).all()


def test_sample(benchmark, raw, stream):
    for s in raw:  # _decode reads the epoch and shard position _raw stamps on each sample
        assert "__epoch__" in s and "__ordinal__" in s
    benchmark.group = f"loader, {SAMPLES} samples"
    items = benchmark(lambda: [stream._decode(s) for s in raw])
    size = stream.image_size
    assert all(item is not None and item["image"].shape == (size, size, 3) for item in items)


def test_batch(benchmark, stream):
    benchmark.group = f"loader, {SAMPLES} samples"
    batch = benchmark(lambda: next(iter(stream)))
    assert batch["image"].shape[0] == SAMPLES and batch["text"].shape[0] == SAMPLES
