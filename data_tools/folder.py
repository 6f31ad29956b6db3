"""A folder of images with sidecar ``.txt`` captions into shards.

    python -m data_tools.folder --input photos/ --out data/photos

Every image (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``, any case, in any subfolder; hidden
folders are skipped) takes its captions from the ``.txt`` file of the same name next to it, one
caption per non-empty line: ``photos/a/cat.jpg`` <- ``photos/a/cat.txt``. An image without one,
and a ``.txt`` without an image, are skipped and reported. Images are split with a fixed seed,
80/20 by default (``--test-fraction``/``--test-size``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from data_tools.shards import (
    IMAGE_SUFFIXES,
    Input,
    Record,
    add_writer_args,
    run_converter,
    skip,
)
from harness.manifest import DataError


def iter_files(root: Path, suffixes: Sequence[str], *, exclude: Path) -> list[Path]:
    """Files under ``root`` with one of ``suffixes`` (any case), sorted; hidden folders and
    ``exclude`` (the output folder, when it is inside the input) are not entered."""
    exclude = exclude.resolve()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and Path(folder, d).resolve() != exclude
        )
        found += [Path(folder, f) for f in files if Path(f).suffix.lower() in suffixes]
    return sorted(found)


def folder_records(root: Path, *, exclude: Path) -> tuple[list[Record], list[dict[str, str]]]:
    """One record per caption line; captionless images and orphan captions reported."""
    images = iter_files(root, IMAGE_SUFFIXES, exclude=exclude)
    texts = set(iter_files(root, (".txt",), exclude=exclude))
    records, skipped = [], []
    for image in images:
        source = image.relative_to(root).as_posix()
        sidecar = image.with_suffix(".txt")
        if sidecar not in texts:
            skipped.append(skip(source, f"no caption file {sidecar.name}"))
            continue
        try:
            lines = sidecar.read_text(encoding="utf-8").splitlines() or [""]
        except (OSError, UnicodeDecodeError) as e:
            skipped.append(skip(source, f"cannot read {sidecar.name} ({e})"))
            continue
        where = sidecar.relative_to(root).as_posix()
        # blank lines are not captions; a file with no caption at all is reported as empty
        captions = [(n, line) for n, line in enumerate(lines, 1) if line.strip()] or [(1, "")]
        records += [
            Record(source, str(image), text, None, f"{where} line {n}") for n, text in captions
        ]
    with_image = {i.with_suffix(".txt") for i in images}
    skipped += [
        skip(t.relative_to(root).as_posix(), "caption file without an image")
        for t in sorted(texts - with_image)
    ]
    return records, skipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.folder", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", type=Path, required=True, help="folder of images + .txt")
    add_writer_args(parser)
    return parser.parse_args(argv)


def read_input(args: argparse.Namespace) -> Input:
    if not args.input.is_dir():
        raise DataError(f"--input {args.input}: not a folder")
    records, skipped = folder_records(args.input, exclude=args.out)
    if not records and not skipped:
        raise DataError(f"--input {args.input}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return Input(records, skipped)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_converter(args, "data_tools.folder", lambda: read_input(args))


if __name__ == "__main__":
    raise SystemExit(main())
