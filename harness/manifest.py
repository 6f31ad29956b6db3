"""The dataset manifest: the one description of a dataset that the harness reads.

A dataset is a folder of WebDataset shards plus ``manifest.json``. Every converter in
``data_tools`` writes this format and ``harness.data`` reads only this format, so a dataset
from any source runs through the same pipeline.

```
{
  "format": "clipbench-manifest/1",
  "name": "builtin-shapes",
  "splits": {
    "train": {"shards": [{"path": "train-000000.tar", "num_samples": 2000,
                          "sha256": "...", "first_index": 0}, ...]},
    "test":  {...}
  },
  "label_tasks": [{"name": "shape", "classes": ["circle", ...],
                   "templates": ["a {}.", ...]}],
  "skipped": [{"source": "img/123.jpg", "reason": "cannot decode"}],
  "source": {...free-form provenance...}
}
```

A sample in a shard has an image (``png``/``jpg``/``jpeg``/``webp``) and either a ``json`` with
``captions`` (a list) or ``caption``, or a ``txt`` caption. Its stable index is the json's
``index`` when present, otherwise ``first_index`` of its shard plus its position in the shard.
Labels for label tasks live in the json under ``labels`` (task name -> class index).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "clipbench-manifest/1"
MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """A dataset or manifest problem, with the file and the reason in the message."""


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    sha256: str
    first_index: int = 0


@dataclass(frozen=True)
class LabelTask:
    name: str
    classes: list[str]
    templates: list[str]


@dataclass(frozen=True)
class SplitInfo:
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    name: str
    splits: dict[str, SplitInfo]
    label_tasks: list[LabelTask] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    root: Path = Path(".")  # folder the shard paths are relative to; not serialised

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(
                f"{self.root / MANIFEST_NAME}: no split {name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s.path) for s in self.split(split).shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "splits": {
                k: {"shards": [asdict(s) for s in v.shards]} for k, v in self.splits.items()
            },
            "label_tasks": [asdict(t) for t in self.label_tasks],
            "skipped": list(self.skipped),
            "source": dict(self.source),
        }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_manifest(manifest: Manifest, folder: str | Path) -> Path:
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_json())
    return path


def manifest_path(path: str | Path) -> Path:
    """Accept either the manifest file or the folder that holds it."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; every problem names the file and the key."""
    path = manifest_path(path)
    if not path.exists():
        raise DataError(f"dataset manifest not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if raw.get("format") != FORMAT:
        raise DataError(f"{path}: key 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(raw.get("splits"), dict) or not raw["splits"]:
        raise DataError(f"{path}: key 'splits' must be a non-empty mapping of split name to shards")
    splits = {name: _parse_split(path, name, s) for name, s in raw["splits"].items()}
    tasks = [_parse_task(path, i, t) for i, t in enumerate(raw.get("label_tasks", []))]
    return Manifest(
        name=str(raw.get("name", path.parent.name)),
        splits=splits,
        label_tasks=tasks,
        skipped=list(raw.get("skipped", [])),
        source=dict(raw.get("source", {})),
        root=path.parent,
    )


def _parse_split(path: Path, name: str, raw: Any) -> SplitInfo:
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list) or not raw["shards"]:
        raise DataError(f"{path}: splits.{name}.shards must be a non-empty list")
    shards = []
    for i, s in enumerate(raw["shards"]):
        missing = {"path", "num_samples", "sha256"} - set(s)
        if missing:
            raise DataError(f"{path}: splits.{name}.shards[{i}] lacks {sorted(missing)}")
        shards.append(
            ShardInfo(
                path=str(s["path"]),
                num_samples=int(s["num_samples"]),
                sha256=str(s["sha256"]),
                first_index=int(s.get("first_index", 0)),
            )
        )
    return SplitInfo(shards=shards)


def _parse_task(path: Path, i: int, raw: Any) -> LabelTask:
    missing = {"name", "classes", "templates"} - set(raw)
    if missing:
        raise DataError(f"{path}: label_tasks[{i}] lacks {sorted(missing)}")
    if not raw["templates"] or any("{}" not in t for t in raw["templates"]):
        raise DataError(f"{path}: label_tasks[{i}].templates must each contain '{{}}'")
    return LabelTask(
        name=raw["name"], classes=list(raw["classes"]), templates=list(raw["templates"])
    )


def check_shards(manifest: Manifest, *, splits: list[str] | None = None, checksums: bool) -> None:
    """Fail before any compute if a shard is missing or (optionally) its checksum differs."""
    for split in splits or list(manifest.splits):
        for shard in manifest.split(split).shards:
            full = manifest.root / shard.path
            if not full.exists():
                raise DataError(f"{manifest.root / MANIFEST_NAME}: shard {shard.path} is missing")
            if checksums and sha256_file(full) != shard.sha256:
                raise DataError(
                    f"{manifest.root / MANIFEST_NAME}: shard {shard.path} does not match its "
                    f"sha256 in the manifest (corrupt or replaced); rebuild or re-validate it"
                )
