"""One sample: what a shard holds for it (captions, index, labels, image bytes), its decoded
image, and the crops training and evaluation take of it."""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from typing import Any

import numpy as np
import pyspng
from PIL import Image

from harness.errors import DataError

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def seeded(*parts: Any) -> int:
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
