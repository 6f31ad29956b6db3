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

from harness import config
from harness.grid import Cell, Grid, cell_args, shared_root
from harness.pipeline import plan_runs


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
        f"cd {shlex.quote(str(config.REPO_ROOT))}",
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


def shared_stage_jobs(
    config_file: Path, bindings: list[str], cells: list[Cell], sweep_dir: Path
) -> list[list[str]]:
    """One job per unique shared stage: run the first cell that needs it up to that stage."""
    jobs, seen = [], set()
    for cell in cells:
        runs = plan_runs(
            [config_file], [*bindings, *cell.bindings], out=cell.directory(sweep_dir),
            shared_root=shared_root(sweep_dir),
        )  # fmt: skip
        for run in runs:
            if run.stage.shared and run.run_dir not in seen:
                seen.add(run.run_dir)
                jobs.append(
                    [*cell_args(config_file, bindings, cell, sweep_dir), "--stage", run.stage.name]
                )
    return jobs


def write_slurm(
    config_file: Path, bindings: list[str], cells: list[Cell], grid: Grid, sweep_dir: Path
) -> Path:
    folder = sweep_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    for i, cell in enumerate(cells):
        (folder / f"cell_{i}.sh").write_text(
            _task_script(grid, cell_args(config_file, bindings, cell, sweep_dir))
        )
    cells_script = folder / "cells.sbatch"
    cells_script.write_text(
        "\n".join(
            [*_header(grid, "clipbench-cells", len(cells), logs), *_array_body(folder, "cell")]
        )
        + "\n"
    )
    shared = shared_stage_jobs(config_file, bindings, cells, sweep_dir)
    for j, args in enumerate(shared):
        (folder / f"shared_{j}.sh").write_text(_task_script(grid, args))
    submit = ["#!/bin/bash", "set -euo pipefail", 'cd "$(dirname "$0")"']
    if shared:
        (folder / "shared.sbatch").write_text(
            "\n".join(
                [
                    *_header(grid, "clipbench-shared", len(shared), logs),
                    *_array_body(folder, "shared"),
                ]
            )
            + "\n"
        )
        submit += [
            "SHARED=$(sbatch --parsable shared.sbatch)",
            'sbatch --dependency=afterok:"$SHARED" cells.sbatch',
        ]
    else:
        submit += ["sbatch cells.sbatch"]
    (folder / "submit.sh").write_text("\n".join(submit) + "\n")
    return cells_script
