"""Sweeps: expand a gin grid, validate every cell, run the cells, write the report.

A grid file binds ``Grid.axes`` to a mapping of axis -> literal values. An axis is a macro
(``METHOD``, ``BATCH_SIZE``, ``SEED``...) or any gin parameter (``TrainConfig.lr_rule``). The
product of the axes gives the cells; each cell is the base config plus one binding per axis.

    SWEEP_DIR/
      sweep.json                  axes, cells (values, bindings, directory), launcher
      cells/<values>__<hash>/     one run directory per cell (or its stage directories)
      shared/<stage>-<hash>/      stages shared between cells (a siclip teacher)
      REPORT.md, plots/           written at the end by ``python -m reports SWEEP_DIR``

Every cell is validated before the first one starts. Cells run in sequence, each in its own
process (``python -m harness.run`` or ``torchrun``), so a crash, NaN or out-of-memory error in one
cell is recorded in that cell's ``status.json`` and the sweep goes on. A rerun skips finished
cells and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import itertools
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin
import torch

from harness import config, distributed, models, rundir, stopping
from harness.config import ConfigError
from harness.errors import EXIT_USER_ERROR
from harness.manifest import writable_dir, write_json_atomic

LAUNCHERS = ("local", "slurm")
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b:? ")


@gin.configurable
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


def configured_grid() -> Grid | None:
    """The parsed config's grid, or None when the config is a single run."""
    try:
        axes = gin.query_parameter("Grid.axes")
    except ValueError:
        return None
    if not axes:
        return None
    try:
        return Grid()
    except ValueError as e:
        raise ConfigError(str(e).split("\n  In call to configurable")[0]) from None


@dataclass(frozen=True)
class Cell:
    values: dict[str, Any]
    bindings: list[str]
    name: str
    config_hash: str

    def directory(self, sweep_dir: Path) -> Path:
        return sweep_dir / "cells" / self.name


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1].lower()


def _value_text(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


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


def expand(grid: Grid) -> list[tuple[dict[str, Any], list[str]]]:
    """The product of the axes: (values, gin bindings) per cell, in a stable order."""
    names = list(grid.axes)
    cells = []
    for combo in itertools.product(*(grid.axes[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        cells.append((values, [f"{axis} = {value!r}" for axis, value in values.items()]))
    return cells


def plan_cells(config_files: list[Path], bindings: list[str], grid: Grid) -> list[Cell]:
    """Parse and validate every cell, every stage of it, before any compute; one clear error
    names the bad cell (and stage)."""
    cells, manifests = [], {}
    for values, cell_bindings in expand(grid):
        label = ", ".join(f"{k}={v!r}" for k, v in values.items())
        try:
            config.parse(config_files, [*bindings, *cell_bindings])
            spec = config.resolve()
            model_cfg = models.model_config(spec.run.model)
            digest = config.config_hash(model_cfg, {"world_size": grid.world_size})
            _check_stages(config_files, [*bindings, *cell_bindings], spec, grid, manifests)
        except (ConfigError, ValueError) as e:
            reason = str(e).split("\n  In call to configurable")[0]  # gin's suffix
            raise ConfigError(f"grid cell ({label}): {reason}") from None
        name = "__".join(f"{_short(k)}={_value_text(v)}" for k, v in values.items()) + f"__{digest}"
        cells.append(Cell(values=values, bindings=cell_bindings, name=name, config_hash=digest))
    return cells


def _check_stages(
    config_files: list[Path], bindings: list[str], spec, grid: Grid, manifests: dict
) -> None:
    """Check every stage the cell will run with the batch, model and data it will train on;
    nothing runs. ``spec`` is the cell's parsed config; a stage with bindings of its own is
    parsed with them, its inputs (earlier stages' directories) unbound: they do not exist yet."""
    from harness.pipeline import check_stage_macros, stages_of

    stages = stages_of(spec)  # builds the cell's method, so checks it
    for stage in stages:
        try:
            stage_spec = spec
            if stage.bindings:  # its own batch, model or budget
                config.parse(config_files, [*bindings, *stage.bindings])
                stage_spec = config.resolve()
            _check_stage(stage_spec, grid, manifests)
        except ValueError as e:  # ConfigError, DataError, ModelError...
            raise ConfigError(e if len(stages) == 1 else f"stage {stage.name!r}: {e}") from None
        check_stage_macros(stage, stage_spec)  # its message names the stage


def _check_stage(spec, grid: Grid, manifests: dict) -> None:
    """What would stop a stage before or during training: model, batch, data, devices."""
    from harness.data import resolve_manifest
    from harness.train import check_data_fits

    models.model_config(spec.run.model)
    _check_batch(spec, grid)
    _check_devices(spec, grid)
    key = spec.data.manifest
    if key not in manifests:
        manifests[key] = resolve_manifest(spec.data)
    check_data_fits(spec, manifests[key], grid.world_size)


def _check_batch(spec, grid: Grid) -> None:
    if spec.train.batch_size % grid.world_size:
        raise ConfigError(
            f"BATCH_SIZE={spec.train.batch_size} is not divisible by the number of processes "
            f"({grid.world_size})"
        )


def _check_devices(spec, grid: Grid) -> None:
    """Each local rank takes its own GPU (NCCL refuses two ranks on one): enough must be visible."""
    if grid.launcher != "local" or grid.nproc_per_node == 1:
        return
    if not distributed.uses_cuda(spec.run.device):
        return
    visible = torch.cuda.device_count()
    if visible < grid.nproc_per_node:
        raise ConfigError(
            f"Grid.nproc_per_node={grid.nproc_per_node} needs one GPU per process and "
            f"{visible} {'is' if visible == 1 else 'are'} visible; lower it or set "
            f"RunConfig.device='cpu'"
        )


# ---------------------------------------------------------------- running


def shared_root(sweep_dir: Path) -> Path:
    """Where a sweep keeps the stages its cells share (a siclip teacher)."""
    return sweep_dir / "shared"


def cell_args(config_file: Path, bindings: list[str], cell: Cell, sweep_dir: Path) -> list[str]:
    """The ``harness.run`` arguments of one cell (all of its stages; resumes a checkpoint)."""
    args = [str(config_file), "--cell", "--resume", "--out", str(cell.directory(sweep_dir)),
            "--shared-root", str(shared_root(sweep_dir))]  # fmt: skip
    for binding in [*bindings, *cell.bindings]:
        args += ["--gin_param", binding]
    return args


def cell_command(
    config_file: Path, bindings: list[str], cell: Cell, sweep_dir: Path, grid: Grid
) -> list[str]:
    """The local command that runs one cell, with torchrun when a cell has several processes."""
    if grid.nproc_per_node > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={grid.nproc_per_node}",
            "-m",
        ]
    else:
        launch = [sys.executable, "-m"]
    return [*launch, "harness.run", *cell_args(config_file, bindings, cell, sweep_dir)]


def run_local(
    config_file: Path, bindings: list[str], cells: list[Cell], grid: Grid, sweep_dir: Path
) -> tuple[dict[str, str], int | None]:
    """Run the cells one after another; returns (cell name -> final status, the stop signal
    received or None).

    A stop signal to the sweep goes on to the running cell, which checkpoints and ends
    ``interrupted``; no further cell starts. A cell whose directory another live process
    holds (an orphan of an earlier sweep, say) is left to it: ``busy``."""
    results = {}
    with CellSignals() as signals:
        for k, cell in enumerate(cells, 1):
            label = f"[{k}/{len(cells)}] {cell.name}"
            if signals.received is not None:
                results[cell.name] = NOT_STARTED
                continue
            results[cell.name] = _start_cell(
                label, cell.directory(sweep_dir),
                cell_command(config_file, bindings, cell, sweep_dir, grid), signals,
            )  # fmt: skip
    return results, signals.received


NOT_STARTED, BUSY = "not started", "busy"


def _start_cell(label: str, cell_dir: Path, command: list[str], signals: CellSignals) -> str:
    if rundir.is_finished(rundir.final_run_dir(cell_dir)):
        print(f"{label}: finished earlier, skipped")
        return rundir.FINISHED
    holder = rundir.lock_holder(cell_dir)
    if holder is not None:
        print(f"{label}: busy, another process trains it ({holder}); skipped", flush=True)
        return BUSY
    stale = rundir.stale_status(cell_dir)
    print(f"{label}: {'resuming (' + stale + ')' if stale else 'running'}", flush=True)
    status = _run_cell(command, cell_dir, signals)
    print(f"{label}: {status}", flush=True)
    return status


class CellSignals:
    """While the sweep runs: a stop signal is remembered and sent on to the running cell."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.cell: subprocess.Popen | None = None
        self._previous: dict = {}

    def __enter__(self) -> CellSignals:
        self._previous = {s: signal.signal(s, self._forward) for s in stopping.STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _forward(self, signum: int, frame) -> None:
        self.received = signum
        if self.cell is not None and self.cell.poll() is None:
            self.cell.send_signal(signum)  # a group signal reached it already: a second is harmless


def _stop_with_parent() -> None:
    """In a cell's process, before it runs: SIGTERM it if the sweep dies (``kill -9``), so that
    it checkpoints and stops instead of training on as an orphan (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _run_cell(command: list[str], cell_dir: Path, signals: CellSignals) -> str:
    cell_dir.mkdir(parents=True, exist_ok=True)
    log_path = cell_dir / "log.txt"
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        signals.cell = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=config.REPO_ROOT,
            preexec_fn=_stop_with_parent,
        )  # fmt: skip
        code = signals.cell.wait()
        signals.cell = None
    status = rundir.read_status(rundir.final_run_dir(cell_dir)) or {}
    if code == 0 and status.get("status") == rundir.FINISHED:
        return rundir.FINISHED
    if code == EXIT_USER_ERROR and rundir.lock_holder(cell_dir) is not None:
        return BUSY  # another process took the cell just before this one: its status is its own
    lines = log_path.read_text(errors="replace").splitlines()
    tail = lines[-30:]
    # the exception line of every process (torchrun prefixes worker output with "[rankN]:")
    errors = [line for line in lines if EXCEPTION_LINE.match(line)][-10:]
    if status.get("status") in (None, "running", rundir.FINISHED) and signals.received:
        # stopped with the sweep before it could say so (still starting, say)
        name = signal.Signals(signals.received).name
        status = {"status": "interrupted", "reason": f"stopped by {name} (exit code {code})"}
    elif status.get("status") in (None, "running", rundir.FINISHED):
        # the process died without saying why (killed, crashed before training, ...)
        reason = f"exit code {code}" + (" (killed by a signal: out of memory?)" if code < 0 else "")
        status = {"status": "failed", "reason": reason}
    # the cell's own log tail (every rank's output under torchrun) goes with the status
    rundir.write_status(
        rundir.final_run_dir(cell_dir), status["status"],
        **{k: v for k, v in status.items() if k not in ("status", "time")},
        exit_code=code, errors=errors, log_tail=tail, seconds=round(time.time() - start, 1),
    )  # fmt: skip
    return status["status"]


def write_sweep_record(
    sweep_dir: Path, config_files: list[Path], bindings: list[str], grid: Grid, cells: list[Cell]
) -> None:
    record = {
        "config_files": [str(p) for p in config_files],
        "bindings": list(bindings),
        "axes": {k: list(v) for k, v in grid.axes.items()},
        "launcher": grid.launcher,
        "world_size": grid.world_size,
        "smoke_check": grid.smoke_check,
        "cells": [
            {
                "name": c.name,
                "values": c.values,
                "bindings": c.bindings,
                # relative, so a copied or moved sweep directory still finds its cells
                "dir": str(c.directory(sweep_dir).relative_to(sweep_dir)),
                "config_hash": c.config_hash,
            }
            for c in cells
        ],
        "git_commit": rundir.git_commit(),
        "packages": rundir.package_versions(),
    }
    previous = rundir.read_json(sweep_dir / "sweep.json") or {}
    if "device_peak_flops" in previous:  # measured once per sweep directory, kept on reruns
        record["device_peak_flops"], record["device_peak_how"] = (
            previous["device_peak_flops"],
            previous["device_peak_how"],
        )
    else:
        import torch

        from harness.costs import device_peak_flops

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        record["device_peak_flops"], record["device_peak_how"] = device_peak_flops(device)
    write_json_atomic(sweep_dir / "sweep.json", record)


def run_sweep(config_file: Path, bindings: list[str], grid: Grid, *, out: Path | None) -> Path:
    """Plan, validate, run (or, for SLURM, write scripts for) every cell; then the report."""
    # absolute: cells run with the repository as their working directory, wherever this started
    sweep_dir = (out or Path("sweeps") / Path(config_file).stem).resolve()
    grid, bindings = pin_axes(grid, bindings)
    cells = plan_cells([config_file], bindings, grid)
    writable_dir(sweep_dir)
    write_sweep_record(sweep_dir, [config_file], bindings, grid, cells)
    print(
        f"sweep {sweep_dir}: {len(cells)} cells ({' x '.join(f'{len(v)} {k}' for k, v in grid.axes.items())})"
    )
    if grid.launcher == "slurm":
        from harness.slurm import write_slurm

        script = write_slurm(config_file, bindings, cells, grid, sweep_dir)
        print(f"wrote {script}; submit with: bash {script.parent / 'submit.sh'}")
        return sweep_dir
    started = time.time()
    summary, stopped_by = run_local(config_file, bindings, cells, grid, sweep_dir)
    write_json_atomic(
        sweep_dir / "results.json", {"status": summary, "seconds": round(time.time() - started, 1)}
    )
    if stopped_by is not None:
        counts = {s: list(summary.values()).count(s) for s in dict.fromkeys(summary.values())}
        print(
            f"sweep stopped by {signal.Signals(stopped_by).name}: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + "; run the same command again to go on from the checkpoints",
            file=sys.stderr,
        )
        raise SystemExit(stopping.EXIT_INTERRUPTED)
    failed = [n for n, s in summary.items() if s != rundir.FINISHED]
    print(
        f"sweep finished in {time.time() - started:.0f} s: {len(cells) - len(failed)} finished, {len(failed)} not"
    )
    if grid.report:
        from reports import build_report

        print(f"report: {build_report(sweep_dir)}")
    return sweep_dir
