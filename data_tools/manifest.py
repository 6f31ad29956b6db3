"""A manifest for existing WebDataset shards (img2dataset-style), without rewriting them.

    python -m data_tools.manifest shards/*.tar                          # last shard = test
    python -m data_tools.manifest shards/*.tar --test-shards '*-00009.tar' --out shards/

Each shard's samples are counted the way the reader groups tar members, its SHA-256 computed,
and ``first_index`` accumulated per split in sorted path order. Samples need an image
(``png``/``jpg``/``jpeg``/``webp``) and a ``txt`` caption or a ``json`` with ``caption(s)``;
``python -m data_tools.validate`` checks that afterwards.

Which shards are the test split, by whole shards: ``--test-shards GLOB`` (repeatable, matched
against each shard's file name and its path as given), otherwise the last ``--num-test-shards``
(default 1) in sorted order. A test split of one shard keeps evaluation (quadratic in its size)
affordable on large datasets. Train and test are disjoint by image only if no image was written
into two shards; img2dataset writes each input row once, so duplicates in its input stay
duplicates.

The manifest goes next to the shards (their common folder) or into ``--out``; shard paths in it
are relative to it.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data_tools.shards import arguments, parallel_map
from harness.errors import report_errors
from harness.files import sha256_file
from harness.manifest import DataError, Manifest, ShardInfo, SplitInfo, save_manifest


@dataclass(frozen=True)
class Counted:
    path: Path
    num_samples: int
    sha256: str


def count_shard(path: Path) -> Counted:
    """Samples as the reader sees them (consecutive members sharing a key), and the checksum."""
    try:
        count = sum(1 for _ in wds.tarfile_samples([{"url": str(path)}]))
    except Exception as e:  # webdataset raises tarfile, OS and value errors alike
        raise DataError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from None
    return Counted(path, count, sha256_file(path))


def split_shards(
    shards: list[Path], *, test_globs: Sequence[str], num_test: int
) -> tuple[list[Path], list[Path]]:
    """(train, test) by whole shards; errors when either would be empty."""
    if test_globs:
        test = [s for s in shards if _matches(s, test_globs)]
        if not test:
            raise DataError(f"--test-shards {test_globs} matches none of the {len(shards)} shards")
    else:
        if num_test < 1:
            raise DataError(f"--num-test-shards is {num_test}; it must be at least 1")
        test = shards[-num_test:]
    train = [s for s in shards if s not in test]
    if not train:
        raise DataError(
            f"all {len(shards)} shards would be test shards; give more shards or fewer test ones"
        )
    return train, test


def _matches(shard: Path, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(shard.name, g) or fnmatch.fnmatch(str(shard), g) for g in globs)


def shard_infos(counted: list[Counted], root: Path) -> list[ShardInfo]:
    infos, first = [], 0
    for c in counted:
        infos.append(ShardInfo(os.path.relpath(c.path, root), c.num_samples, c.sha256, first))
        first += c.num_samples
    return infos


def build_manifest(
    shards: list[Path],
    *,
    out: Path | None = None,
    test_globs: Sequence[str] = (),
    num_test: int = 1,
    name: str | None = None,
    workers: int = 2,
    progress: bool = True,
    provenance: dict | None = None,
) -> Path:
    """Write ``manifest.json`` describing ``shards``; return its path."""
    for s in shards:
        if not s.is_file():
            raise DataError(f"shard {s}: file not found")
    shards = sorted(set(shards))
    train, test = split_shards(shards, test_globs=test_globs, num_test=num_test)
    root = out or Path(os.path.commonpath([s.resolve().parent for s in shards]))
    counted = parallel_map(
        count_shard, shards, workers=workers, desc="data_tools.manifest", progress=progress
    )
    by_path = {c.path: c for c in counted}
    manifest = Manifest(
        name=name or root.resolve().name,
        splits={
            "train": SplitInfo(shard_infos([by_path[s] for s in train], root)),
            "test": SplitInfo(shard_infos([by_path[s] for s in test], root)),
        },
        source={"converter": "data_tools.manifest", **(provenance or {})},
    )
    return save_manifest(manifest, root)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.manifest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("shards", type=Path, nargs="+", help="tar shards")
    parser.add_argument("--out", type=Path, default=None, help="folder of manifest.json")
    parser.add_argument(
        "--test-shards", action="append", default=[], metavar="GLOB",
        help="shards of the test split (file name or path glob, repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--num-test-shards", type=int, default=1,
        help="without --test-shards: the last N shards in sorted order are test (default 1)",
    )  # fmt: skip
    parser.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with report_errors():
        path = build_manifest(
            args.shards,
            out=args.out,
            test_globs=args.test_shards,
            num_test=args.num_test_shards,
            name=args.name,
            workers=args.workers,
            progress=not args.no_progress,
            provenance={"arguments": arguments(args)},
        )
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
