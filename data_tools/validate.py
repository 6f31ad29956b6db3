"""Check a dataset against its manifest: every shard present, intact and fully decodable.

    python -m data_tools.validate data/coco-val2017          # or .../manifest.json

For every shard of every split: the file exists, its SHA-256 and sample count match the
manifest, and every sample has parseable captions and an image that decodes, read with the
harness's own reader functions (``harness.data.sample_meta`` and ``decode_image``), so what
passes here is what training reads. Across a split, stable indices must be unique; across
splits, no image ``source`` may appear twice. Prints a summary per split (samples, images,
captions per image, corrupt entries) and every problem; exits 1 on any problem, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from data_tools.shards import parallel_map
from harness.data.samples import decode_image, sample_meta
from harness.errors import report_errors
from harness.files import sha256_file
from harness.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest

MAX_LISTED = 50


@dataclass
class ShardCheck:
    split: str
    path: str
    samples: int = 0
    captions: list[int] = field(default_factory=list)  # per good sample
    indices: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def corrupt(self) -> int:
        return self.samples - len(self.captions)


def sample_problem(sample: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(what is wrong or None, its meta) for one raw sample."""
    try:
        meta = sample_meta(sample)
    except Exception as e:  # bad JSON, bad UTF-8, a JSON that is not an object: all corrupt
        return f"unreadable json/txt ({type(e).__name__}: {e})", {}
    if not meta["captions"]:
        return "no caption", meta
    try:
        decode_image(sample)
    except Exception as e:  # whatever the decoder raises, the sample is corrupt
        return f"cannot decode image ({type(e).__name__}: {e})", meta
    return None, meta


def check_shard(job: tuple[str, str, ShardInfo]) -> ShardCheck:
    root, split, info = job
    path = Path(root) / info.path
    check = ShardCheck(split, info.path)
    if not path.is_file():
        check.problems.append(f"{info.path}: missing")
        return check
    if sha256_file(path) != info.sha256:
        check.problems.append(f"{info.path}: sha256 differs from the manifest")

    def tar_error(exn: Exception) -> bool:
        check.problems.append(f"{info.path}: unreadable tar ({type(exn).__name__}: {exn})")
        return True  # keep reading whatever follows

    samples = wds.tarfile_samples([{"url": str(path)}], handler=tar_error)
    for ordinal, sample in enumerate(samples):
        check.samples += 1
        problem, meta = sample_problem(sample)
        if problem is not None:
            check.problems.append(f"{info.path} sample {sample.get('__key__')}: {problem}")
            continue
        index = meta["index"]
        check.indices.append(info.first_index + ordinal if index is None else int(index))
        check.captions.append(len(meta["captions"]))
        if "json" in sample and (source := json.loads(sample["json"]).get("source")):
            check.sources.append(str(source))
    if check.samples != info.num_samples:
        check.problems.append(
            f"{info.path}: {check.samples} samples, the manifest says {info.num_samples}"
        )
    return check


def cross_problems(checks: list[ShardCheck]) -> list[str]:
    """Duplicate indices within a split; images present in two splits."""
    problems = []
    for split in dict.fromkeys(c.split for c in checks):
        counts = Counter(i for c in checks if c.split == split for i in c.indices)
        dupes = sorted(i for i, n in counts.items() if n > 1)
        if dupes:
            problems.append(f"split {split}: {len(dupes)} indices repeat, e.g. {dupes[:5]}")
    seen: dict[str, str] = {}
    for c in checks:
        for source in c.sources:
            if seen.setdefault(source, c.split) != c.split:
                problems.append(f"image {source!r} is in split {seen[source]} and {c.split}")
    return problems


def summary(manifest: Manifest, checks: list[ShardCheck]) -> str:
    rows = [f"{'split':<8}{'shards':>7}{'samples':>9}{'images':>8}{'captions':>10}"
            f"   {'per image (min-max)':<21}{'corrupt':>7}"]  # fmt: skip
    for split in manifest.splits:
        mine = [c for c in checks if c.split == split]
        caps = [n for c in mine for n in c.captions]
        per = f"{sum(caps) / len(caps):.2f} ({min(caps)}-{max(caps)})" if caps else "-"
        rows.append(
            f"{split:<8}{len(mine):>7}{sum(c.samples for c in mine):>9}{len(caps):>8}"
            f"{sum(caps):>10}   {per:<21}{sum(c.corrupt for c in mine):>7}"
        )
    return "\n".join(rows)


def validate(path: str | Path, *, workers: int = 2, progress: bool = True) -> list[str]:
    """Print the summary and the problems; return the problems (empty: valid)."""
    manifest = load_manifest(path)
    jobs = [
        (str(manifest.root), split, shard)
        for split, info in manifest.splits.items()
        for shard in info.shards
    ]
    checks = parallel_map(
        check_shard, jobs, workers=workers, desc="data_tools.validate", progress=progress
    )
    problems = [p for c in checks for p in c.problems] + cross_problems(checks)
    print(f"dataset {manifest.name!r}: {manifest.root / MANIFEST_NAME}")
    print(summary(manifest, checks))
    if manifest.skipped:
        print(
            f"left out during conversion: {len(manifest.skipped)} (see 'skipped' in the manifest)"
        )
    for problem in problems[:MAX_LISTED]:
        print(f"  problem: {problem}")
    if len(problems) > MAX_LISTED:
        print(f"  ... and {len(problems) - MAX_LISTED} more")
    print(f"FAILED: {len(problems)} problem(s)" if problems else "OK")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.validate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dataset", type=Path, help="dataset folder or its manifest.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with report_errors():
        problems = validate(args.dataset, workers=args.workers, progress=not args.no_progress)
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
