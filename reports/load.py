"""Read a sweep directory into plain records. Files only: this package never imports harness."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass
class Stage:
    name: str
    run_dir: Path
    shared: bool
    run: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)

    @property
    def samples_seen(self) -> int:
        batch = self.run.get("train", {}).get("batch_size", 0)
        return int(self.status.get("step", 0)) * int(batch)


def main_stage(stages: list[Stage]) -> Stage:
    """The stage that trains the cell's objective at the cell's batch: the first stage the cell
    owns (a shared teacher is not; superclass's stage 1 is, its LiT readout may run at another
    batch). Batch, seed, throughput and cost columns come from it."""
    return next((s for s in stages if not s.shared), stages[-1])


# The axes every report table is laid out on; any other axis (a learning-rate rule, a model)
# makes variants of a method, each its own row, compared with clip's run of the same variant.
TABLE_AXES = ("METHOD", "BATCH_SIZE", "SEED", "RunConfig.method", "TrainConfig.batch_size",
              "TrainConfig.seed")  # fmt: skip


def variant_of(values: dict[str, Any]) -> str:
    """The cell's values on axes other than method, batch and seed ('' when there are none)."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items() if k not in TABLE_AXES)


def row_label(method: str, variant: str) -> str:
    return f"{method} ({variant})" if variant else method


@dataclass
class CellResult:
    name: str
    values: dict[str, Any]
    method: str
    batch: int
    seed: int
    stages: list[Stage]
    per_query: dict = field(default_factory=dict)
    directory: Path | None = None

    @property
    def variant(self) -> str:
        return variant_of(self.values)

    @property
    def row(self) -> str:
        """The report row: the method, and its variant when the sweep has other axes."""
        return row_label(self.method, self.variant)

    @property
    def final(self) -> Stage:
        """The stage whose evaluation is the cell's result (superclass: LiT)."""
        return self.stages[-1]

    @property
    def main(self) -> Stage:
        return main_stage(self.stages)

    @property
    def status(self) -> str:
        return self.final.status.get("status", "missing")

    @property
    def finished(self) -> bool:
        return self.status == "finished" and bool(self.final.metrics)


@dataclass
class Sweep:
    directory: Path
    record: dict
    cells: list[CellResult]

    @property
    def methods(self) -> list[str]:
        axis = self.record.get("axes", {}).get("METHOD")
        seen = axis or []
        return list(dict.fromkeys([*seen, *(c.method for c in self.cells)]))

    @property
    def rows(self) -> list[str]:
        """Report rows in axis order: every variant's methods, the variants in cell order."""
        variants = list(dict.fromkeys(c.variant for c in self.cells))
        return [
            row_label(m, v)
            for v in variants
            for m in self.methods
            if any(c.method == m and c.variant == v for c in self.cells)
        ]

    def baseline_row(self, row: str, baseline: str) -> str:
        """The row of ``baseline`` (clip) with the same variant as ``row``."""
        variant = next(c.variant for c in self.cells if c.row == row)
        return row_label(baseline, variant)

    @property
    def batches(self) -> list[int]:
        return sorted({c.batch for c in self.cells})

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.cells})


def lock_is_held(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's ``.lock`` (an flock, which the kernel
    releases when its holder dies: a ``running`` status nobody holds is a dead run's)."""
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def load_stage(name: str, run_dir: Path, shared: bool) -> Stage:
    return Stage(
        name=name,
        run_dir=run_dir,
        shared=shared,
        run=read_json(run_dir / "run.json") or {},
        status=read_json(run_dir / "status.json") or {},
        metrics=read_json(run_dir / "eval.json") or {},
        costs=read_json(run_dir / "costs.json") or {},
        throughput=read_json(run_dir / "throughput.json") or {},
    )


def load_cell(entry: dict, sweep_dir: Path) -> CellResult:
    # both records hold paths relative to where they live (an absolute path stays as it is)
    cell_dir = sweep_dir / entry["dir"]
    listed = (read_json(cell_dir / "stages.json") or {}).get("stages")
    if listed:
        # normalised: cells sharing a stage name it ../../shared/<stage>, one directory for all
        stages = [
            load_stage(
                s["name"], Path(os.path.normpath(cell_dir / s["run_dir"])), s.get("shared", False)
            )
            for s in listed
        ]
    else:
        stages = [load_stage("main", cell_dir, False)]
    values = entry.get("values", {})
    final = stages[-1]
    train = main_stage(stages).run.get("train", {})
    return CellResult(
        name=entry["name"],
        values=values,
        method=final.run.get("method", values.get("METHOD", "?")),
        batch=int(train.get("batch_size", values.get("BATCH_SIZE", 0))),
        seed=int(train.get("seed", values.get("SEED", 0))),
        stages=stages,
        per_query=read_json(final.run_dir / "eval_ranks.json") or {},
        directory=cell_dir,
    )


def load_sweep(directory: str | Path) -> Sweep:
    directory = Path(directory)
    record = read_json(directory / "sweep.json")
    if record is None:
        raise FileNotFoundError(
            f"{directory / 'sweep.json'} not found: is {directory} a sweep directory?"
        )
    cells = [load_cell(c, directory) for c in record["cells"]]
    return Sweep(directory=directory, record=record, cells=cells)
