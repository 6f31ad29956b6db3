"""Image-caption pairs from a CSV, TSV or JSONL file into shards: one row per (image, caption).

    python -m data_tools.pairs --input pairs.csv --image-root images/ --out data/mine
    python -m data_tools.pairs --input pairs.jsonl --image-column file --caption-column text \\
        --out data/mine

Several rows may name the same image: its captions are kept together in one sample, in row
order. Image paths are relative to ``--image-root`` (default: the input file's folder) unless
absolute. The format comes from the extension (``.csv``, ``.tsv``, ``.jsonl``) or ``--format``.

Splits: a ``split`` column (or ``--split-column NAME``) with ``train``/``test`` in every row is
honoured; rows of one image must agree. Text is read as UTF-8 (or UTF-16 with a byte-order
mark); give any other encoding with ``--encoding`` (``latin-1``, ``cp1252``, ``utf-16-le``...). Without one, images are split with a fixed seed, 80/20
by default (``--test-fraction``/``--test-size``).
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_tools.shards import Input, Record, add_writer_args, run_converter, skip
from harness.manifest import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
SPLITS = ("train", "test")


def detect_format(path: Path, given: str | None) -> str:
    fmt = given or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"--input {path}: cannot tell the format from {path.suffix!r}; "
            f"use one of {sorted(FORMATS)} or --format {{csv,tsv,jsonl}}"
        )
    return fmt


def read_rows(
    path: Path, fmt: str, encoding: str | None = None
) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns, [(line number, row)]): the header's columns, or the first JSONL row's keys."""
    if not path.is_file():
        raise DataError(f"--input {path}: file not found")
    text = io.StringIO(read_text(path, encoding), newline="")
    if fmt == "jsonl":
        rows = list(_jsonl_rows(path, text))
        return (list(rows[0][1]) if rows else []), rows
    reader = csv.DictReader(text, delimiter="\t" if fmt == "tsv" else ",")
    columns = list(reader.fieldnames or [])
    return columns, [(reader.line_num, row) for row in reader]


def read_text(path: Path, encoding: str | None) -> str:
    """The file's text: ``encoding`` if given, else UTF-8 (a byte-order mark of UTF-8 or
    UTF-16 decides instead); text it is not is named by line and byte."""
    data = path.read_bytes()
    if encoding is None:
        utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        if not utf16 and b"\0" in data:  # no text file holds NUL bytes; UTF-16 is full of them
            raise DataError(
                f"--input {path}: holds NUL bytes, as UTF-16 without a byte-order mark does; "
                "name the file's encoding, e.g. --encoding utf-16-le"
            )
        encoding = "utf-16" if utf16 else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"--input {path} line {line}: not {e.encoding} text (byte 0x{data[e.start]:02x} at "
            f"offset {e.start}); name the file's encoding, e.g. --encoding latin-1"
        ) from None
    return text


def known_encoding(name: str) -> str:
    """argparse type of ``--encoding``: a codec Python knows."""
    try:
        codecs.lookup(name)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {name!r}") from None
    return name


def _jsonl_rows(path: Path, lines: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {row!r:.40}")
        yield number, row


def check_columns(path: Path, columns: list[str], wanted: dict[str, str | None]) -> None:
    """Fail before any work when a named column is absent."""
    for flag, name in wanted.items():
        if name is not None and name not in columns:
            raise DataError(f"--input {path}: no column {name!r} ({flag}); it has {columns}")


def pair_records(
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    *,
    image_root: Path,
    image_column: str,
    caption_column: str,
    split_column: str | None,
) -> tuple[list[Record], list[dict[str, str]]]:
    records, skipped = [], []
    for number, row in rows:
        where = f"{path.name} line {number}"
        for column in (image_column, caption_column, split_column):
            if column is not None and column not in row:  # JSONL rows can differ from the first
                raise DataError(f"{path} line {number}: no key {column!r}")
        name = str(row[image_column] or "").strip()
        if not name:
            skipped.append(skip(where, "no image path"))
            continue
        split = _split_value(path, number, row, split_column)
        source = os.path.normpath(name)  # "./a.jpg" and "a.jpg" are one image
        records.append(Record(source, str(image_root / source), row[caption_column], split, where))
    return records, skipped


def _split_value(path: Path, number: int, row: dict[str, Any], column: str | None) -> str | None:
    if column is None:
        return None
    value = str(row[column] or "").strip().lower()
    if value not in SPLITS:
        raise DataError(
            f"{path} line {number}: column {column!r} is {row[column]!r}; expected one of {SPLITS}"
        )
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.pairs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", type=Path, required=True, help="a .csv, .tsv or .jsonl file")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())), default=None)
    parser.add_argument(
        "--encoding", type=known_encoding, default=None,
        help="the input's text encoding (default: UTF-8, or UTF-16 with a byte-order mark)",
    )  # fmt: skip
    parser.add_argument(
        "--image-root", type=Path, default=None, help="folder image paths are relative to"
    )
    parser.add_argument("--image-column", default="image", help="default 'image'")
    parser.add_argument("--caption-column", default="caption", help="default 'caption'")
    parser.add_argument(
        "--split-column", default=None,
        help="train/test column (default: 'split' when the input has it, else a seeded split)",
    )  # fmt: skip
    add_writer_args(parser)
    return parser.parse_args(argv)


def read_input(args: argparse.Namespace) -> Input:
    image_root = args.image_root or args.input.parent
    if not image_root.is_dir():
        raise DataError(f"--image-root {image_root}: not a folder")
    columns, rows = read_rows(args.input, detect_format(args.input, args.format), args.encoding)
    split_column = args.split_column or ("split" if "split" in columns else None)
    check_columns(
        args.input,
        columns,
        {
            "--image-column": args.image_column,
            "--caption-column": args.caption_column,
            "--split-column": split_column,
        },
    )
    records, skipped = pair_records(
        args.input,
        rows,
        image_root=image_root,
        image_column=args.image_column,
        caption_column=args.caption_column,
        split_column=split_column,
    )
    return Input(records, skipped, {"split_column": split_column})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_converter(args, "data_tools.pairs", lambda: read_input(args))


if __name__ == "__main__":
    raise SystemExit(main())
