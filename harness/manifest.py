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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import DataError
from harness.files import sha256_file, write_json_atomic

FORMAT = "clipbench-manifest/1"
MANIFEST_NAME = "manifest.json"


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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: must hold a JSON object, not {type(raw).__name__}")
    for key, kind in (("label_tasks", list), ("skipped", list), ("source", dict)):
        if not isinstance(raw.get(key, kind()), kind):
            raise DataError(
                f"{path}: key {key!r} must be a {'list' if kind is list else 'mapping'}"
            )
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
        where = f"{path}: splits.{name}.shards[{i}]"
        if not isinstance(s, dict):
            raise DataError(f"{where} must be an object with path, num_samples and sha256")
        missing = {"path", "num_samples", "sha256"} - set(s)
        if missing:
            raise DataError(f"{where} lacks {sorted(missing)}")
        shards.append(
            ShardInfo(
                path=_typed(s, "path", str, where),
                num_samples=_typed(s, "num_samples", int, where, minimum=0),
                sha256=_typed(s, "sha256", str, where),
                first_index=_typed({"first_index": 0, **s}, "first_index", int, where, minimum=0),
            )
        )
    return SplitInfo(shards=shards)


def _typed(raw: dict, key: str, kind: type, where: str, *, minimum: int | None = None) -> Any:
    """``raw[key]`` if it is a ``kind`` (a bool is no number here), else one error naming it."""
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(
            f"{where}.{key} is {value!r}; expected {'a string' if kind is str else 'an integer'}"
        )
    if minimum is not None and value < minimum:
        raise DataError(f"{where}.{key} is {value!r}; expected at least {minimum}")
    return value


def _parse_task(path: Path, i: int, raw: Any) -> LabelTask:
    where = f"{path}: label_tasks[{i}]"
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be an object with name, classes and templates")
    missing = {"name", "classes", "templates"} - set(raw)
    if missing:
        raise DataError(f"{where} lacks {sorted(missing)}")
    for key in ("classes", "templates"):
        if not isinstance(raw[key], list) or not all(isinstance(x, str) for x in raw[key]):
            raise DataError(f"{where}.{key} must be a list of strings, not {raw[key]!r:.60}")
    if not raw["templates"] or any("{}" not in t for t in raw["templates"]):
        raise DataError(f"{where}.templates must each contain '{{}}'")
    return LabelTask(
        name=_typed(raw, "name", str, where), classes=list(raw["classes"]),
        templates=list(raw["templates"]),
    )  # fmt: skip


def check_shards(manifest: Manifest, *, splits: list[str] | None = None, checksums: bool) -> None:
    """Fail before any compute if a shard is missing or (optionally) its checksum differs."""
    for split in splits or list(manifest.splits):
        for shard in manifest.split(split).shards:
            full = manifest.root / shard.path
            if not full.exists():
                raise DataError(f"{manifest.root / MANIFEST_NAME}: shard {shard.path} is missing")
            if not full.is_file():  # a device or a pipe would be read (hashed) forever
                raise DataError(
                    f"{manifest.root / MANIFEST_NAME}: shard {shard.path} is not a regular file"
                )
            if checksums and sha256_file(full) != shard.sha256:
                raise DataError(
                    f"{manifest.root / MANIFEST_NAME}: shard {shard.path} does not match its "
                    f"sha256 in the manifest (corrupt or replaced); rebuild or re-validate it"
                )
