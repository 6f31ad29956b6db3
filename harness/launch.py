"""Running a sweep's plan on this machine: its record, each cell in a process of its own, the
report.

    SWEEP_DIR/
      sweep.json                  axes, cells (values, bindings, directory), provenance, peak
      plan.json                   the whole plan, which every cell's process runs from
      cells/<values>__<hash>/     one run directory per cell (or its stage directories)
      shared/<stage>-<hash>/      stages shared between cells (a siclip teacher)
      results.json                each cell's final status
      REPORT.md, plots/           written at the end by ``python -m reports SWEEP_DIR``

Cells run in sequence, each as ``python -m harness.run --plan plan.json --cell NAME`` (or under
torchrun), so a crash, NaN or out-of-memory error in one is recorded in its ``status.json`` and
the sweep goes on. A rerun skips finished cells and resumes the others from their checkpoints.
A stop signal to the sweep goes on to the running cell, which checkpoints and ends
``interrupted``; no further cell starts.
"""

from __future__ import annotations

import ctypes
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import stopping
from harness.costs import device_peak_flops
from harness.errors import EXIT_USER_ERROR
from harness.files import read_json, writable_dir, write_json_atomic
from harness.plan import CellPlan, SweepPlan, sweep_to_json
from harness.rundir import FINISHED, RunDir, git_commit, package_versions

REPO_ROOT = Path(__file__).resolve().parent.parent
NOT_STARTED, BUSY = "not started", "busy"


def write_sweep(plan: SweepPlan) -> Path:
    """sweep.json (what reports read) and plan.json (what cells run); returns plan.json."""
    writable_dir(plan.directory)
    record = {
        "config_files": list(plan.config_files), "bindings": list(plan.bindings),
        "axes": {k: list(v) for k, v in plan.grid.axes.items()}, "launcher": plan.grid.launcher,
        "world_size": plan.grid.world_size, "smoke_check": plan.grid.smoke_check,
        "cells": [
            # relative, so a copied or moved sweep directory still finds its cells
            {"name": c.name, "values": c.values, "bindings": list(c.bindings),
             "dir": str(c.directory.relative_to(plan.directory)), "config_hash": c.config_hash}
            for c in plan.cells
        ],
        "git_commit": git_commit(), "packages": package_versions(),
    }  # fmt: skip
    previous = read_json(plan.directory / "sweep.json") or {}
    if "device_peak_flops" in previous:  # measured once per sweep directory, kept on reruns
        record["device_peak_flops"] = previous["device_peak_flops"]
        record["device_peak_how"] = previous["device_peak_how"]
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        record["device_peak_flops"], record["device_peak_how"] = device_peak_flops(device)
    write_json_atomic(plan.directory / "sweep.json", record)
    write_json_atomic(plan.directory / "plan.json", sweep_to_json(plan))
    return plan.directory / "plan.json"


def cell_args(plan_file: Path, cell: CellPlan) -> list[str]:
    """The ``harness.run`` arguments of one cell (all of its stages; resumes a checkpoint)."""
    return ["--plan", str(plan_file), "--cell", cell.name, "--resume"]


def run_sweep(plan: SweepPlan) -> Path:
    """Run every cell here, one after another, then write the report."""
    plan_file = write_sweep(plan)
    started = time.time()
    summary, stopped_by = run_cells(plan, plan_file)
    write_json_atomic(plan.directory / "results.json",
                      {"status": summary, "seconds": round(time.time() - started, 1)})  # fmt: skip
    if stopped_by is not None:
        counts = {s: list(summary.values()).count(s) for s in dict.fromkeys(summary.values())}
        print(
            f"sweep stopped by {signal.Signals(stopped_by).name}: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + "; run the same command again to go on from the checkpoints",
            file=sys.stderr,
        )
        raise SystemExit(stopping.EXIT_INTERRUPTED)
    failed = [n for n, s in summary.items() if s != FINISHED]
    done = len(plan.cells) - len(failed)
    print(f"sweep finished in {time.time() - started:.0f} s: {done} finished, {len(failed)} not")
    if plan.grid.report:
        from reports import build_report

        print(f"report: {build_report(plan.directory)}")
    return plan.directory


def run_cells(plan: SweepPlan, plan_file: Path) -> tuple[dict[str, str], int | None]:
    """(cell name -> final status, the stop signal received or None). A cell whose directory
    another live process holds (an orphan of an earlier sweep, say) is left to it: ``busy``."""
    results = {}
    with CellSignals() as signals:
        for k, cell in enumerate(plan.cells, 1):
            if signals.received is not None:
                results[cell.name] = NOT_STARTED
                continue
            label = f"[{k}/{len(plan.cells)}] {cell.name}"
            results[cell.name] = _start_cell(label, cell, _command(plan, plan_file, cell), signals)
    return results, signals.received


def _command(plan: SweepPlan, plan_file: Path, cell: CellPlan) -> list[str]:
    """The local command of one cell, with torchrun when a cell has several processes."""
    launch = [sys.executable, "-m"]
    if plan.grid.nproc_per_node > 1:
        launch += ["torch.distributed.run", f"--nproc_per_node={plan.grid.nproc_per_node}", "-m"]
    return [*launch, "harness.run", *cell_args(plan_file, cell)]


def _start_cell(label: str, cell: CellPlan, command: list[str], signals: CellSignals) -> str:
    run = RunDir(cell.directory)
    if run.final().finished:
        print(f"{label}: finished earlier, skipped")
        return FINISHED
    holder = run.holder()
    if holder is not None:
        print(f"{label}: busy, another process trains it ({holder}); skipped", flush=True)
        return BUSY
    stale = run.stale()
    print(f"{label}: {'resuming (' + stale + ')' if stale else 'running'}", flush=True)
    status = _run_cell(command, run, signals)
    print(f"{label}: {status}", flush=True)
    return status


def _run_cell(command: list[str], run: RunDir, signals: CellSignals) -> str:
    run.path.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run.log, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        signals.cell = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=REPO_ROOT, preexec_fn=_stop_with_parent)  # fmt: skip
        code = signals.cell.wait()
        signals.cell = None
    if code == EXIT_USER_ERROR and run.holder() is not None:
        return BUSY  # another process took the cell just before this one: its status is its own
    stopped_by = signal.Signals(signals.received).name if signals.received else None
    return run.record_exit(code, seconds=time.time() - start, stopped_by=stopped_by)


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
