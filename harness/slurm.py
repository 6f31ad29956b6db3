"""SLURM launcher: sbatch array scripts for a grid; nothing is run here.

    SWEEP_DIR/slurm/
      cells.sbatch      an array job, one task per cell, each task one multi-node torchrun
      cell_<i>.sh       the exact command of cell i
      shared.sbatch     (if any cell has shared stages) an array over the unique shared stages
      shared_<j>.sh
      submit.sh         submits shared.sbatch first and cells.sbatch with afterok on it

Each task runs ``torchrun`` with the c10d rendezvous on the first node of its allocation, so a
cell may span several nodes. Cells resume from their checkpoints when a task is requeued.

Time limits and pre-emption: SLURM sends the batch script SIGUSR1 ``Grid.slurm_signal_seconds``
before the end (``--signal=B:USR1@N``, also where a pre-emption policy gives notice). The
script's trap sends SIGTERM to the step (srun forwards it to the task, torchrun to its
workers), each cell checkpoints at its next step boundary and ends ``interrupted``, and the
script requeues its array task, which resumes from that checkpoint.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from harness.grid import Grid
from harness.launch import REPO_ROOT, cell_args, write_sweep
from harness.plan import SweepPlan


def _header(grid: Grid, name: str, array: int, log_dir: Path) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{array - 1}",
        f"#SBATCH --nodes={grid.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={grid.slurm_cpus_per_task}",
        f"#SBATCH --time={grid.slurm_time}",
        f"#SBATCH --output={log_dir}/%x_%A_%a.out",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{grid.slurm_signal_seconds}",
    ]
    if grid.slurm_gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={grid.slurm_gpus_per_node}")
    if grid.slurm_partition:
        lines.append(f"#SBATCH --partition={grid.slurm_partition}")
    return lines


def _array_body(folder: Path, prefix: str) -> list[str]:
    # sbatch runs a spooled copy of the script, so task scripts are named by absolute path
    task = shlex.quote(str(folder.resolve() / prefix)) + "_${SLURM_ARRAY_TASK_ID}.sh"
    return [
        "set -uo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        'export HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "# the time limit is near (or pre-emption): the cell checkpoints and stops; requeue it",
        "requeue=0 step=",
        "trap 'requeue=1; kill -TERM \"$step\" 2>/dev/null' USR1",
        f"srun --kill-on-bad-exit=1 bash {task} &",
        "step=$!",
        'wait "$step"; code=$?',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; code=$?; done  # a trap ended wait',
        'if [ "$requeue" = 1 ]; then',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "    exit 0",
        "fi",
        'exit "$code"',
    ]


def _task_script(grid: Grid, harness_args: list[str]) -> str:
    torchrun = [
        "${PYTHON:-python}", "-m", "torch.distributed.run",
        "--nnodes=$SLURM_NNODES", f"--nproc_per_node={grid.nproc_per_node}",
        "--rdzv_backend=c10d", "--rdzv_endpoint=$HEAD_NODE:${MASTER_PORT:-29500}",
        "--rdzv_id=$SLURM_JOB_ID", "-m", "harness.run",
    ]  # fmt: skip
    # exec: the task is torchrun itself, so the SIGTERM srun forwards reaches it
    quoted = "exec " + " ".join(torchrun) + " " + shlex.join(harness_args)
    return "#!/bin/bash\nset -euo pipefail\n" + quoted + "\n"


def shared_stage_jobs(plan: SweepPlan, plan_file: Path) -> list[list[str]]:
    """One job per unique shared stage: run the first cell that needs it up to that stage."""
    jobs, seen = [], set()
    for cell in plan.cells:
        for stage in cell.stages:
            if stage.shared and stage.run_dir not in seen:
                seen.add(stage.run_dir)
                jobs.append([*cell_args(plan_file, cell), "--stage", stage.name])
    return jobs


def write_slurm(plan: SweepPlan) -> Path:
    """The sweep's record and plan, and the SLURM scripts that run it; returns cells.sbatch."""
    plan_file = write_sweep(plan)
    grid, folder = plan.grid, plan.directory / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(plan.cells):
        (folder / f"cell_{i}.sh").write_text(_task_script(grid, cell_args(plan_file, cell)))
    cells_script = folder / "cells.sbatch"
    header = _header(grid, "clipbench-cells", len(plan.cells), folder / "logs")
    cells_script.write_text("\n".join([*header, *_array_body(folder, "cell")]) + "\n")
    shared = shared_stage_jobs(plan, plan_file)
    for j, args in enumerate(shared):
        (folder / f"shared_{j}.sh").write_text(_task_script(grid, args))
    submit = ["#!/bin/bash", "set -euo pipefail", 'cd "$(dirname "$0")"']
    if shared:
        header = _header(grid, "clipbench-shared", len(shared), folder / "logs")
        (folder / "shared.sbatch").write_text(
            "\n".join([*header, *_array_body(folder, "shared")]) + "\n"
        )
        submit += ["SHARED=$(sbatch --parsable shared.sbatch)",
                   'sbatch --dependency=afterok:"$SHARED" cells.sbatch']  # fmt: skip
    else:
        submit += ["sbatch cells.sbatch"]
    (folder / "submit.sh").write_text("\n".join(submit) + "\n")
    return cells_script
