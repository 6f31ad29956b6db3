"""Sweeps: expansion and up-front validation, kill-and-rerun, failed cells, the SLURM script."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import config
from harness.errors import ConfigError
from harness.grid import Grid, pin_axes
from harness.plan import validate_sweep
from harness.planner import plan_sweep
from tests.conftest import REPO, run_cli


def write_grid(tmp_path, axes: str, extra: str = "", name: str = "sweep.gin"):
    path = tmp_path / name
    path.write_text(
        "include 'configs/base.gin'\n"
        "MODEL = 'micro-vit'\nTRAIN_SAMPLES = 320\nTrainConfig.warmup_samples = 32\n"
        "TrainConfig.progress_bar = False\nEvalConfig.probe_train_samples = 100\n"
        f"Grid.report = False\n{extra}\nGrid.axes = {axes}\n"
    )
    return path


def planned(tmp_path, tiny_data, axes, extra="", **grid_kwargs):
    """The sweep's cells, planned and validated as ``harness.run`` does before any runs."""
    path = write_grid(tmp_path, axes, extra)
    bindings = [f"DATA='{tiny_data}'"]
    config.parse([path], bindings)
    grid = Grid(**{**config.configured_grid().__dict__, **grid_kwargs})
    plan = plan_sweep(path, bindings, grid, out=tmp_path / "sweep")
    validate_sweep(plan)
    return plan.cells


def test_expansion_is_the_ordered_product():
    grid = Grid(
        axes={"METHOD": ["clip"], "BATCH_SIZE": [32, 64], "TrainConfig.lr_rule": ["none", "sqrt"]}
    )
    cells = grid.cells()
    assert [v for v, _ in cells] == [
        {"METHOD": "clip", "BATCH_SIZE": b, "TrainConfig.lr_rule": r}
        for b in (32, 64)
        for r in ("none", "sqrt")
    ]
    assert cells[1][1] == ["METHOD = 'clip'", "BATCH_SIZE = 32", "TrainConfig.lr_rule = 'sqrt'"]


def test_cells_are_named_by_values_and_config_hash(tmp_path, tiny_data):
    cells = planned(tmp_path, tiny_data, "{'BATCH_SIZE': [32, 64], 'SEED': [0]}")
    assert [c.name.rsplit("__", 1)[0] for c in cells] == [
        "batch_size=32__seed=0",
        "batch_size=64__seed=0",
    ]
    assert len({c.config_hash for c in cells}) == 2


@pytest.mark.parametrize(
    ("axes", "grid_kwargs", "message"),
    [
        ("{'METHOD': ['clip', 'clipp']}", {}, "METHOD='clipp'.*unknown method 'clipp'.*clip"),
        (
            "{'BATCH_SIZE': [32, 33]}",
            {"nproc_per_node": 2, "extra": "RunConfig.device = 'cpu'"},
            "BATCH_SIZE=33.*not divisible",
        ),
        ("{'BATCH_SIZE': [32, 100000]}", {}, "BATCH_SIZE=100000.*larger than the training split"),
        ("{'MODEL': ['micro-vit', 'nope']}", {}, "unknown model 'nope'"),
        # a later stage's own batch: superclass's LiT readout (64), siclip's teacher (512)
        (
            "{'METHOD': ['superclass'], 'BATCH_SIZE': [33]}",
            {"nproc_per_node": 3, "extra": "RunConfig.device = 'cpu'"},
            "METHOD='superclass'.*stage 'lit': BATCH_SIZE=64 is not divisible.*\\(3\\)",
        ),
        (
            "{'METHOD': ['siclip'], 'BATCH_SIZE': [32]}",
            {"extra": "siclip.teacher_model = 'micro-vit-teacher'"},
            "stage 'teacher': BATCH_SIZE=512 is larger than the training split",
        ),
        # a stage's budget is a macro: a direct binding of the field would silently win
        (
            "{'METHOD': ['superclass'], 'BATCH_SIZE': [32]}",
            {"extra": "TrainConfig.train_samples = 320"},
            "METHOD='superclass'.*: stage 'lit' sets TRAIN_SAMPLES = 160, but TrainConfig.train_samples "
            "resolves to 320.*bind TRAIN_SAMPLES instead",
        ),
    ],
)
def test_every_cell_is_validated_before_any_runs(tmp_path, tiny_data, axes, grid_kwargs, message):
    with pytest.raises(ConfigError, match=message):
        planned(tmp_path, tiny_data, axes, **grid_kwargs)


def test_cells_whose_later_stages_need_earlier_ones_plan(tmp_path, tiny_data):
    """siclip's student names a teacher directory, superclass's LiT its stage 1: neither exists
    before the sweep runs, and planning must not ask for them."""
    teacher = "siclip.teacher_model = 'micro-vit-teacher'\nsiclip.teacher_batch_size = 32"
    cells = planned(tmp_path, tiny_data, "{'METHOD': ['siclip', 'superclass']}", teacher)
    assert [c.values["METHOD"] for c in cells] == ["siclip", "superclass"]


def test_a_misspelt_axis_macro_is_refused_before_any_run(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"SEEDS=1.*macro SEEDS is bound but nothing uses it"):
        planned(tmp_path, tiny_data, "{'SEEDS': [1]}")
    # a file's own macro that an axis overrides is not a misspelling
    lr = planned(
        tmp_path, tiny_data, "{'TrainConfig.lr': [1e-3, 2e-3]}", "LR = 5e-4\nTrainConfig.lr = %LR"
    )
    assert [c.values["TrainConfig.lr"] for c in lr] == [1e-3, 2e-3]


def test_a_command_line_binding_of_an_axis_narrows_it(tmp_path, tiny_data, capsys):
    """README: `--gin_param "SEED=1"` on a grid with `'SEED': [0]` runs seed 1, not seed 0."""
    grid = Grid(
        axes={"METHOD": ["clip", "superclip"], "SEED": [0], "TrainConfig.lr_rule": ["none"]}
    )
    pinned, rest = pin_axes(
        grid, ["SEED=1", "DATA='x'", "TrainConfig.lr_rule = 'sqrt'", "METHOD=['clip']"]
    )
    assert pinned.axes == {"METHOD": ["clip"], "SEED": [1], "TrainConfig.lr_rule": ["sqrt"]}
    assert rest == ["DATA='x'"]
    assert "axis SEED [0] -> [1]" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"SEED=%OTHER.*literals"):
        pin_axes(grid, ["SEED=%OTHER"])
    path = write_grid(tmp_path, "{'BATCH_SIZE': [32], 'SEED': [0]}")
    config.parse([path], [f"DATA='{tiny_data}'", "SEED=1"])
    (cell,) = plan_sweep(
        path, ["SEED=1", f"DATA='{tiny_data}'"], config.configured_grid(), out=tmp_path / "s"
    ).cells
    assert cell.values == {"BATCH_SIZE": 32, "SEED": 1} and cell.name.startswith(
        "batch_size=32__seed=1__"
    )
    config.parse([path], [f"DATA='{tiny_data}'", *cell.bindings])
    assert config.resolve().train.seed == 1


def test_adding_seeds_or_batches_keeps_the_cells_already_planned(tmp_path, tiny_data):
    (first,) = planned(tmp_path, tiny_data, "{'BATCH_SIZE': [32], 'SEED': [0]}")
    more = planned(tmp_path, tiny_data, "{'BATCH_SIZE': [32, 64], 'SEED': [0, 1]}")
    assert first.name in [c.name for c in more] and len({c.name for c in more}) == 4
    cpu = "RunConfig.device = 'cpu'"
    (one,) = planned(tmp_path, tiny_data, "{'SEED': [0]}", cpu)
    (two,) = planned(tmp_path, tiny_data, "{'SEED': [0]}", cpu, nproc_per_node=2)
    assert one.name != two.name  # the world size can change a result: it is hashed


def test_more_local_processes_than_gpus_is_refused_before_any_run(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"nproc_per_node=2 needs one GPU per process and 1 is"):
        planned(tmp_path, tiny_data, "{'SEED': [0]}", nproc_per_node=2)
    assert planned(tmp_path, tiny_data, "{'SEED': [0]}", nproc_per_node=1)
    cpu = planned(
        tmp_path, tiny_data, "{'SEED': [0]}", "RunConfig.device = 'cpu'", nproc_per_node=2
    )
    assert len(cpu) == 1


def test_a_rank_without_its_own_gpu_is_refused(monkeypatch):
    from harness import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 needs GPU 1; visible GPUs: 1"):
        distributed.init("auto")


def test_bad_grid_values_are_refused(tmp_path, tiny_data, capsys):
    path = write_grid(tmp_path, "{'SEED': []}")
    from harness.run import main

    with pytest.raises(SystemExit) as code:
        main([str(path), "--gin_param", f"DATA='{tiny_data}'"])
    assert (
        code.value.code == 2
        and "Grid.axes['SEED'] must be a non-empty list" in capsys.readouterr().err
    )


def read(path):
    return json.loads(Path(path).read_text())


def cell_dirs(sweep):
    return [sweep / cell["dir"] for cell in json.loads((sweep / "sweep.json").read_text())["cells"]]


@pytest.mark.slow
def test_killed_sweep_rerun_skips_finished_cells_and_resumes_the_interrupted_one(
    tmp_path, tiny_data
):
    path = write_grid(
        tmp_path, "{'SEED': [0, 1, 2]}",
        "TRAIN_SAMPLES = 3200\nTrainConfig.checkpoint_every_samples = 320\nBATCH_SIZE = 32",
    )  # fmt: skip
    sweep = tmp_path / "sweep"
    argv = [
        sys.executable,
        "-m",
        "harness.run",
        str(path),
        "--out",
        str(sweep),
        "--gin_param",
        f"DATA='{tiny_data}'",
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            dirs = cell_dirs(sweep) if (sweep / "sweep.json").exists() else []
            if dirs and (os.path.exists(f"{dirs[1]}/checkpoints/latest.pt")):
                break
            time.sleep(0.05)
        else:
            pytest.fail("second cell never checkpointed")
        os.killpg(proc.pid, signal.SIGKILL)  # as if the machine died
    finally:
        proc.wait()
    first, second, third = cell_dirs(sweep)
    assert read(f"{first}/status.json")["status"] == "finished"
    assert read(f"{second}/status.json")["status"] == "running"
    stamp = os.stat(f"{first}/eval.json").st_mtime_ns

    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "finished earlier, skipped" in rerun.stdout
    assert os.stat(f"{first}/eval.json").st_mtime_ns == stamp  # not redone
    for d in (second, third):
        assert read(f"{d}/status.json")["status"] == "finished"
    # resumed from its checkpoint: the log ends at the last step, with no step logged twice
    # except those between the last checkpoint and the kill
    steps = [
        json.loads(line)["step"]
        for line in Path(f"{second}/metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == 100 and steps[0] == 10 and steps == sorted(set(steps))  # each step once


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_data):
    path = write_grid(tmp_path, "{'TrainConfig.lr': [1e9, 1e-3]}")
    sweep = tmp_path / "sweep"
    done = run_cli(
        "harness.run", str(path), "--out", str(sweep), "--gin_param", f"DATA='{tiny_data}'"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bad, good = cell_dirs(sweep)
    status = read(f"{bad}/status.json")
    assert status["status"] == "diverged" and status["step"] == 1
    assert read(f"{good}/status.json")["status"] == "finished"
    results = json.loads((sweep / "results.json").read_text())["status"]
    assert sorted(results.values()) == ["diverged", "finished"]


@pytest.mark.slow
def test_a_sweep_started_elsewhere_and_then_moved_still_reports_every_cell(tmp_path, tiny_data):
    # a relative --out from a directory other than the repository, and a two-stage method whose
    # stages.json names its stage directories: the report must find them after a move
    path = write_grid(tmp_path, "{'METHOD': ['clip', 'superclass']}", "TRAIN_SAMPLES = 64")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-m", "harness.run", str(path), "--out", "mine"]
    started = subprocess.run(
        [*argv, "--gin_param", f"DATA='{tiny_data}'"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    assert (elsewhere / "mine" / "sweep.json").exists() and not (REPO / "mine").exists()
    moved = tmp_path / "archive" / "mine"
    moved.parent.mkdir()
    (elsewhere / "mine").rename(moved)
    report = subprocess.run(
        [sys.executable, "-m", "reports", str(moved)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    text = (moved / "REPORT.md").read_text()
    assert "2 of 2 cells finished" in text


def test_slurm_script_for_a_2x5_grid(tmp_path, tiny_data):
    path = write_grid(
        tmp_path, "{'SEED': [0, 1], 'BATCH_SIZE': [16, 32, 64, 128, 256]}",
        "Grid.launcher = 'slurm'\nGrid.nodes = 2\nGrid.nproc_per_node = 4\nGrid.slurm_gpus_per_node = 4\n"
        "Grid.slurm_partition = 'gpu'",
    )  # fmt: skip
    sweep = tmp_path / "sweep"
    done = run_cli(
        "harness.run", str(path), "--out", str(sweep), "--gin_param", f"DATA='{tiny_data}'"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    slurm = sweep / "slurm"
    header = (slurm / "cells.sbatch").read_text()
    for line in ("#SBATCH --array=0-9", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "srun --kill-on-bad-exit=1",
                 "#SBATCH --signal=B:USR1@120"):  # fmt: skip
        assert line in header, line
    assert not (sweep / "cells").exists()  # nothing ran
    tasks = sorted(slurm.glob("cell_*.sh"))
    assert len(tasks) == 10
    task = (slurm / "cell_7.sh").read_text()
    assert (
        "--nnodes=$SLURM_NNODES --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:${MASTER_PORT:-29500}"
        in task
    )
    assert f"--plan {sweep / 'plan.json'} --cell seed=1__batch_size=64__" in task
    assert task.rstrip().endswith("--resume")
    cell = json.loads((sweep / "plan.json").read_text())["cells"][7]  # the plan holds its spec
    assert cell["values"] == {"SEED": 1, "BATCH_SIZE": 64}
    assert cell["stages"][0]["spec"]["train"]["batch_size"] == 64
    assert (slurm / "submit.sh").read_text().strip().endswith("sbatch cells.sbatch")
    assert subprocess.run(["bash", "-n", str(slurm / "cells.sbatch")]).returncode == 0


@pytest.mark.parametrize("sweep", ["batch_sweep", "seed_sweep"])
def test_shipped_sweeps_plan_the_cells_of_their_committed_reports(sweep, monkeypatch):
    """A binding added to a shipped gin file renames every cell (the hash covers every method's
    bindings), and the README's commands would no longer reproduce the example reports."""
    path = REPO / "configs" / f"{sweep}.gin"
    config.parse([path], [])
    cells = plan_sweep(path, [], config.configured_grid(), out=None).cells  # planning reads no data
    report = (REPO / "reports" / "examples" / sweep / "REPORT.md").read_text()
    committed = set(re.findall(r"method=\w+?__batch_size=\d+__seed=\d+__[0-9a-f]{10}", report))
    assert len(committed) == len(cells)
    assert {cell.name for cell in cells} == committed
