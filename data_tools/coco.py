"""COCO-style caption annotations into shards: every caption of an image in one sample.

    python -m data_tools.coco --images val2017 --captions annotations/captions_val2017.json \\
        --out data/coco-val2017
    python -m data_tools.coco --images train2014 val2014 \\
        --captions captions_train2014.json captions_val2014.json \\
        --karpathy dataset_coco.json --out data/coco-karpathy

Without ``--karpathy`` the images are split by image id with a fixed seed, 80/20 by default
(``--test-fraction``/``--test-size``); COCO val2017's 5,000 images give 4,000 train / 1,000 test.

With ``--karpathy dataset_coco.json`` (Karpathy & Fei-Fei's split file, matched on ``cocoid``):
``train`` and ``restval`` -> train, ``test`` -> test (the 5,000-image test set the literature
reports), ``val`` -> a third split ``val`` by default. The harness trains on ``train`` and
evaluates on ``test``, so the 5k numbers stay comparable with published ones; folding ``val``
into test (``--karpathy-val test``) would make a 10,000-image gallery whose recall@k is not.
Images of the caption files missing from the split file are skipped and reported.

A ``file_name`` is looked up in each ``--images`` folder in turn (COCO 2014 keeps train and val
images in separate folders). Captions are ordered by annotation id.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_tools.shards import Input, Record, add_writer_args, run_converter, skip
from harness.manifest import DataError

KARPATHY_SPLITS = {"train": "train", "restval": "train", "test": "test"}  # + "val": --karpathy-val


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path}: not valid JSON ({e})") from None


def require(path: Path, obj: Any, keys: tuple[str, ...], where: str) -> None:
    """Fail with the file, the place and the missing key."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {where} is not a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{path}: {where} lacks key {missing[0]!r}")


def load_captions(path: Path) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """(image id -> file_name, annotations sorted by id) of one COCO captions file."""
    raw = read_json(path, "--captions")
    require(path, raw, ("images", "annotations"), "the top level")
    for i, img in enumerate(raw["images"]):
        require(path, img, ("id", "file_name"), f"images[{i}]")
    for i, ann in enumerate(raw["annotations"]):
        require(path, ann, ("image_id", "caption"), f"annotations[{i}]")
    files = {img["id"]: img["file_name"] for img in raw["images"]}
    annotations = sorted(raw["annotations"], key=lambda a: (a.get("id", 0), a["image_id"]))
    return files, annotations


def karpathy_splits(path: Path, val_to: str) -> dict[int, str]:
    """cocoid -> train/test/(val_to) from Karpathy's dataset_coco.json."""
    raw = read_json(path, "--karpathy")
    require(path, raw, ("images",), "the top level")
    mapping = {**KARPATHY_SPLITS, "val": val_to}
    out = {}
    for i, img in enumerate(raw["images"]):
        require(path, img, ("cocoid", "split"), f"images[{i}]")
        if img["split"] not in mapping:
            raise DataError(
                f"{path}: images[{i}].split is {img['split']!r}; expected one of {sorted(mapping)}"
            )
        out[img["cocoid"]] = mapping[img["split"]]
    return out


def find_image(file_name: str, folders: list[Path]) -> Path:
    """The first folder that has the file; the first folder's path when none has it."""
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name
    return folders[0] / file_name


def coco_records(
    images: list[Path], captions: list[Path], splits: dict[int, str] | None
) -> tuple[list[Record], list[dict[str, str]]]:
    """Records of every annotation, and the entries skipped before any image is read."""
    loaded = [(path, *load_captions(path)) for path in captions]  # all input checked first
    records, skipped = [], []
    for path, files, anns in loaded:
        found = {image_id: str(find_image(name, images)) for image_id, name in files.items()}
        captioned = set()
        for ann in anns:
            image_id = ann["image_id"]
            origin = f"{path.name} annotation {ann.get('id', '?')}"
            if image_id not in files:
                skipped.append(skip(origin, f"image_id {image_id} is not in 'images'"))
            elif splits is None or image_id in splits:  # the others are reported per image below
                captioned.add(image_id)
                split = splits[image_id] if splits is not None else None
                records.append(
                    Record(files[image_id], found[image_id], ann["caption"], split, origin)
                )
        skipped += _uncaptioned(path, files, captioned, splits)
    return records, skipped


def _uncaptioned(
    path: Path, files: dict[int, str], captioned: set[int], splits: dict[int, str] | None
) -> Iterator[dict[str, str]]:
    for image_id, name in sorted(files.items()):
        if splits is not None and image_id not in splits:
            yield skip(name, "not in the --karpathy split file")
        elif image_id not in captioned:
            yield skip(name, f"no annotation in {path.name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.coco", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--images", type=Path, nargs="+", required=True, help="image folder(s), searched in order"
    )
    parser.add_argument(
        "--captions", type=Path, nargs="+", required=True, help="COCO captions_*.json file(s)"
    )
    parser.add_argument("--karpathy", type=Path, default=None, help="dataset_coco.json split file")
    parser.add_argument(
        "--karpathy-val", choices=("val", "test", "train"), default="val",
        help="where Karpathy's 'val' images go (default: a split of their own, 'val')",
    )  # fmt: skip
    add_writer_args(parser)
    return parser.parse_args(argv)


def read_input(args: argparse.Namespace) -> Input:
    for folder in args.images:
        if not folder.is_dir():
            raise DataError(f"--images {folder}: not a folder")
    splits = karpathy_splits(args.karpathy, args.karpathy_val) if args.karpathy else None
    records, skipped = coco_records(args.images, args.captions, splits)
    return Input(records, skipped, {"split": "karpathy" if splits else "seeded"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_converter(args, "data_tools.coco", lambda: read_input(args))


if __name__ == "__main__":
    raise SystemExit(main())
