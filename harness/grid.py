"""A sweep's grid: its axes and how its cells are launched.

A grid file binds ``Grid.axes`` to a mapping of axis -> literal values. An axis is a macro
(``METHOD``, ``BATCH_SIZE``, ``SEED``...) or any gin parameter (``TrainConfig.lr_rule``). The
product of the axes gives the cells; each cell is the base config plus one binding per axis.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class Grid:
    """Axes to sweep and how to launch the cells."""

    axes: dict[str, list] = field(default_factory=dict)
    launcher: str = "local"  # local | slurm (writes sbatch scripts, runs nothing)
    nproc_per_node: int = 1  # processes per node for each cell (>1: torchrun)
    nodes: int = 1  # SLURM only: nodes per cell
    slurm_partition: str | None = None
    slurm_time: str = "04:00:00"
    slurm_gpus_per_node: int = 0
    slurm_cpus_per_task: int = 8
    slurm_signal_seconds: int = 120  # notice before the time limit: checkpoint, then requeue
    report: bool = True  # write REPORT.md when the sweep ends
    smoke_check: bool = False  # a budget too small to compare methods: the report says so first

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"Grid.launcher={self.launcher!r}; choose one of {LAUNCHERS}")
        for axis, values in self.axes.items():
            if not isinstance(values, list | tuple) or not values:
                raise ValueError(f"Grid.axes[{axis!r}] must be a non-empty list of values")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nodes

    @property
    def gpus_per_cell(self) -> int:
        """The GPUs a cell takes on this machine: the local launcher gives each rank its own."""
        return self.nproc_per_node if self.launcher == "local" and self.nproc_per_node > 1 else 0

    def cells(self) -> list[tuple[dict[str, Any], list[str]]]:
        """The product of the axes: (values, gin bindings) per cell, in a stable order."""
        names = list(self.axes)
        cells = []
        for combo in itertools.product(*(self.axes[n] for n in names)):
            values = dict(zip(names, combo, strict=True))
            cells.append((values, [f"{axis} = {value!r}" for axis, value in values.items()]))
        return cells


def cell_name(values: dict[str, Any], config_hash: str) -> str:
    """'method=clip__batch_size=32__seed=0__<hash>': the cell's values, then its config hash."""

    def short(axis: str) -> str:
        return axis.rsplit(".", 1)[-1].lower()

    def text(value: Any) -> str:
        return str(value).replace("/", "_").replace(" ", "")

    return "__".join(f"{short(k)}={text(v)}" for k, v in values.items()) + f"__{config_hash}"


def pin_axes(grid: Grid, bindings: list[str]) -> tuple[Grid, list[str]]:
    """A command-line binding of an axis (``--gin_param "SEED=1"``) narrows that axis to its
    value (a list: to those values); left among the bindings, each cell's own axis binding
    would override it unseen. Returns the grid and the bindings that are not axes."""
    axes, rest = dict(grid.axes), []
    for binding in bindings:
        name, sep, value = (part.strip() for part in binding.partition("="))
        if not sep or name not in axes:
            rest.append(binding)
            continue
        try:
            value = ast.literal_eval(value)
            axes[name] = value if isinstance(value, list) else [value]  # "SEED=[0, 1]": both
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"--gin_param {binding!r} binds the grid axis {name}, whose values must be "
                f"literals (a number, a quoted string, a list...)"
            ) from None
        print(f"--gin_param {binding!r}: axis {name} {grid.axes[name]} -> {axes[name]}")
    return dataclasses.replace(grid, axes=axes), rest
