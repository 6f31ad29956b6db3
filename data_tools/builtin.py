"""The built-in dataset: procedural scenes of coloured shapes whose captions need attribute binding.

Each image holds one to three objects, each with a shape, a colour, a size and a cell of a 3x3
grid. Captions name every object in a random order with varied word orders ("a large red circle
on the left", "on the left, a red circle, large", "a large circle coloured red on the left"), so
a bag of words is not enough: which colour goes with which shape is carried only by syntax.

The test split is built from *binding twins*: every base scene is paired with a twin that has
exactly the same words in its captions but two objects' colours (or shapes, sizes, places)
swapped, so ranking the right image first requires binding, not word matching. Discrete scene
signatures of the test split never occur in the training split.

Everything is a pure function of the spec: each image is drawn from its own RNG seeded by
(seed, split, index), shards are written with fixed tar metadata, and the manifest records
their SHA-256. Running the builder again on a valid output reuses it.

    python -m data_tools.builtin --out data/builtin
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from harness.files import sha256_file
from harness.manifest import (
    MANIFEST_NAME,
    DataError,
    LabelTask,
    Manifest,
    ShardInfo,
    SplitInfo,
    check_shards,
    load_manifest,
    save_manifest,
)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (145, 55, 200),
    "orange": (245, 135, 25),
    "white": (238, 238, 238),
    "cyan": (40, 205, 215),
}
SIZES = ("small", "large")
CELLS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
PLACE_PHRASES = {
    "top left": ("in the top left", "at the top left"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "at the top right"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "at the bottom right"),
}
LABEL_TASKS = (
    LabelTask("shape", list(SHAPES), ["a {}.", "a small {}.", "a large {}."]),
    LabelTask("colour", list(COLOURS), [f"a {{}} {shape}." for shape in SHAPES]),
)
GENERATOR_VERSION = 3  # bump whenever the generator's output changes


@dataclass(frozen=True)
class BuiltinSpec:
    """Everything that determines the dataset's bytes."""

    seed: int = 0
    num_train: int = 50_000
    num_test: int = 1_000  # half base scenes, half their binding twins
    train_captions: int = 2
    test_captions: int = 5
    image_size: int = 48
    shard_size: int = 2_000
    max_objects: int = 3

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int


Scene = tuple[Obj, ...]


def signature(scene: Scene) -> tuple:
    return tuple(sorted((o.shape, o.colour, o.size, o.cell) for o in scene))


# ---------------------------------------------------------------- scenes


def random_scene(rng: random.Random, max_objects: int) -> Scene:
    count = rng.choices(range(1, max_objects + 1), weights=[4, 3.5, 2.5][:max_objects])[0]
    cells = rng.sample(range(len(CELLS)), count)
    return tuple(
        Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), cell)
        for cell in cells
    )


def binding_twin(scene: Scene, rng: random.Random) -> Scene:
    """A different scene described by the same multiset of words, when the scene allows one.

    Tries every (attribute, pair of objects) swap in a random order; a single object, or objects
    that differ only in place, get one attribute changed instead.
    """
    objs = list(scene)
    swaps = [
        (attr, i, j)
        for attr in ("colour", "shape", "size", "cell")
        for i in range(len(objs))
        for j in range(i + 1, len(objs))
    ]
    rng.shuffle(swaps)
    for attr, i, j in swaps:
        a, b = getattr(objs[i], attr), getattr(objs[j], attr)
        twin = list(objs)
        twin[i] = Obj(**{**asdict(objs[i]), attr: b})
        twin[j] = Obj(**{**asdict(objs[j]), attr: a})
        if a != b and signature(tuple(twin)) != signature(scene):
            return tuple(twin)
    o = objs[0]
    colour = rng.choice([c for c in COLOURS if c != o.colour])
    return (Obj(o.shape, colour, o.size, o.cell), *objs[1:])


# ---------------------------------------------------------------- captions


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def object_phrase(o: Obj, rng: random.Random) -> str:
    place = rng.choice(PLACE_PHRASES[CELLS[o.cell]])
    form = rng.randrange(4)
    if form == 0:
        return f"{_a(o.size)} {o.colour} {o.shape} {place}"
    if form == 1:
        return f"{place}, {_a(o.size)} {o.colour} {o.shape}"
    if form == 2:
        return f"{_a(o.colour)} {o.shape}, {o.size}, {place}"
    return f"{_a(o.size)} {o.shape} coloured {o.colour} {place}"


def caption(scene: Scene, rng: random.Random) -> str:
    objs = list(scene)
    rng.shuffle(objs)
    phrases = [object_phrase(o, rng) for o in objs]
    if len(phrases) == 1:
        return phrases[0]
    joiner = rng.randrange(3)
    if joiner == 0:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if joiner == 1:
        return "; ".join(phrases)
    return ". ".join(phrases)


def captions(scene: Scene, n: int, rng: random.Random) -> list[str]:
    """n captions, distinct where the templates allow it."""
    out: list[str] = []
    for _ in range(20 * n):
        text = caption(scene, rng)
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    while len(out) < n:
        out.append(caption(scene, rng))
    return out


# ---------------------------------------------------------------- rendering


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw at 4x and downsample, so edges are anti-aliased and small shapes stay legible."""
    scale = 4
    big = size * scale
    shade = rng.randint(25, 90)
    img = Image.new("RGB", (big, big), (shade, shade, shade + rng.randint(-10, 10)))
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in scene:
        radius = cell * (0.22 if o.size == "small" else 0.42)
        row, col = divmod(o.cell, 3)
        jitter = cell * 0.5 - radius
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.8
        _draw_shape(draw, o.shape, cx, cy, radius, COLOURS[o.colour])
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.38)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill
        )
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- splits


def _rng(spec: BuiltinSpec, split: str, index: int) -> random.Random:
    key = f"{spec.seed}/{split}/{index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def make_test_scenes(spec: BuiltinSpec) -> list[Scene]:
    """Base scenes at even indices, their binding twins at the odd ones."""
    scenes: list[Scene] = []
    seen: set[tuple] = set()
    base = 0
    while len(scenes) < spec.num_test:
        rng = _rng(spec, "test-base", base)
        base += 1
        scene = random_scene(rng, spec.max_objects)
        twin = binding_twin(scene, rng)
        if signature(scene) in seen or signature(twin) in seen:
            continue
        seen.update((signature(scene), signature(twin)))
        scenes.extend([scene, twin])
    return scenes[: spec.num_test]


def train_scene(spec: BuiltinSpec, index: int, held_out: set[tuple]) -> tuple[Scene, random.Random]:
    rng = _rng(spec, "train", index)
    while True:
        scene = random_scene(rng, spec.max_objects)
        if signature(scene) not in held_out:
            return scene, rng


def labels(scene: Scene) -> dict[str, int]:
    """Label tasks are defined on single-object scenes only."""
    if len(scene) != 1:
        return {}
    return {"shape": SHAPES.index(scene[0].shape), "colour": list(COLOURS).index(scene[0].colour)}


def encode_sample(index: int, scene: Scene, texts: list[str], image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    meta = {
        "index": index,
        "captions": texts,
        "labels": labels(scene),
        "objects": [asdict(o) for o in scene],
    }
    return {"__key__": f"{index:08d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()}


def _samples(spec: BuiltinSpec, split: str, start: int, stop: int) -> Iterator[dict]:
    held_out = {signature(s) for s in make_test_scenes(spec)}
    scenes = make_test_scenes(spec) if split == "test" else None
    for index in range(start, stop):
        if split == "test":
            scene, rng = scenes[index], _rng(spec, "test", index)
            texts = captions(scene, spec.test_captions, rng)
        else:
            scene, rng = train_scene(spec, index, held_out)
            texts = captions(scene, spec.train_captions, rng)
        yield encode_sample(index, scene, texts, render(scene, spec.image_size, rng))


def _write_shard(args: tuple[BuiltinSpec, str, int, int, str]) -> ShardInfo:
    spec, split, start, stop, path = args
    # an int mtime: with a float, tarfile adds a pax header to every member and reading is 2x slower
    with open(path, "wb") as stream, wds.TarWriter(stream, mtime=0) as sink:
        for sample in _samples(spec, split, start, stop):
            sink.write(sample)
    return ShardInfo(Path(path).name, stop - start, sha256_file(path), first_index=start)


# ---------------------------------------------------------------- build


def default_dir(spec: BuiltinSpec, root: str | Path = "data") -> Path:
    return Path(root) / f"builtin-{spec.fingerprint()}"


def build(spec: BuiltinSpec, out: str | Path, *, workers: int = 2, verbose: bool = True) -> Path:
    """Build the dataset into ``out`` (idempotent); return the manifest path."""
    out = Path(out)
    if _is_valid(out, spec):
        return out / MANIFEST_NAME
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    jobs = []
    for split, total in (("test", spec.num_test), ("train", spec.num_train)):
        for k, start in enumerate(range(0, total, spec.shard_size)):
            stop = min(start + spec.shard_size, total)
            jobs.append((spec, split, start, stop, str(tmp / f"{split}-{k:06d}.tar")))
    if verbose:
        print(
            f"building the built-in dataset ({spec.num_train} train / {spec.num_test} test) in {out}"
        )
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        infos = list(pool.map(_write_shard, jobs))
    splits = {
        split: SplitInfo([i for (job, i) in zip(jobs, infos, strict=True) if job[1] == split])
        for split in ("train", "test")
    }
    manifest = Manifest(
        name="builtin-shapes",
        splits=splits,
        label_tasks=list(LABEL_TASKS),
        source={
            "generator": "data_tools.builtin",
            "version": GENERATOR_VERSION,
            "spec": asdict(spec),
        },
    )
    save_manifest(manifest, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out / MANIFEST_NAME


def _is_valid(out: Path, spec: BuiltinSpec) -> bool:
    """An existing output is reused only if it was made from this spec and its shards check out."""
    if not (out / MANIFEST_NAME).exists():
        return False
    try:
        manifest = load_manifest(out)
        check_shards(manifest, checksums=True)
    except DataError:
        return False
    recorded = manifest.source.get("spec"), manifest.source.get("version")
    return recorded == (asdict(spec), GENERATOR_VERSION)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: data/builtin-<hash>)")
    parser.add_argument("--seed", type=int, default=BuiltinSpec.seed)
    parser.add_argument("--num-train", type=int, default=BuiltinSpec.num_train)
    parser.add_argument("--num-test", type=int, default=BuiltinSpec.num_test)
    parser.add_argument("--image-size", type=int, default=BuiltinSpec.image_size)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    spec = BuiltinSpec(
        seed=args.seed, num_train=args.num_train, num_test=args.num_test, image_size=args.image_size
    )
    path = build(spec, args.out or default_dir(spec), workers=args.workers)
    print(path)


if __name__ == "__main__":
    main()
