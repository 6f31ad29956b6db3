"""Stopped the way clusters stop runs: a signal to the whole process group (``timeout``,
``scancel``, ``docker stop``), to a sweep's parent, to a torchrun job, SLURM's pre-emption
notice; one trainer per run directory; a dead run's ``running`` status recognised; a sweep
killed again and again ends as if it had never been disturbed."""

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness import checkpoint
from tests.conftest import REPO
from tests.test_faults import smoke, wait_for
from tests.test_grid import cell_dirs, read, write_grid


def started(argv, **kwargs) -> subprocess.Popen:
    """``argv`` in a process group of its own, as a shell job, a SLURM step or a container is."""
    return subprocess.Popen(
        argv, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )  # fmt: skip


def logged(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and path.stat().st_size > 0


def steps_of(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, to_group",
    [
        (signal.SIGTERM, True),
        (signal.SIGINT, True),
        (signal.SIGUSR1, True),
        (signal.SIGTERM, False),
    ],
)
def test_a_stop_signal_checkpoints_at_the_next_step_and_exits_130(
    tmp_path, tiny_data, sig, to_group
):
    """To the group, the loader worker gets it too (it used to die first and fail the run)."""
    out = tmp_path / "run"
    proc = started(smoke(out, tiny_data, "--gin_param", "TRAIN_SAMPLES=64000"))
    wait_for(lambda: logged(out))
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    status = read(out / "status.json")
    assert status["status"] == "interrupted", status
    assert signal.Signals(sig).name in status["reason"] and "checkpoint saved" in status["reason"]
    assert checkpoint.load(checkpoint.latest(out))["step"] == status["step"]
    assert steps_of(out)[-1] == status["step"]  # the step it stopped at, logged


@pytest.mark.slow
def test_a_torchrun_job_stopped_as_a_group_checkpoints_every_rank(tmp_path, tiny_data):
    out = tmp_path / "run"
    argv = smoke(out, tiny_data, "--gin_param", "TRAIN_SAMPLES=64000")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "-m", *argv[2:]]  # fmt: skip
    proc = started(torchrun)
    wait_for(lambda: logged(out), timeout=180)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun, both ranks and their loader workers
    _, err = proc.communicate(timeout=120)
    status = read(out / "status.json")
    assert status["status"] == "interrupted", err[-3000:]
    saved = checkpoint.load(checkpoint.latest(out))
    assert saved["step"] == status["step"] and saved["world_size"] == 2
    assert len(saved["data_position"]["reader_samples"]) == 2  # both ranks' readers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_argv(path: Path, sweep: Path, tiny_data: Path) -> list[str]:
    return [sys.executable, "-m", "harness.run", str(path), "--out", str(sweep),
            "--gin_param", f"DATA='{tiny_data}'"]  # fmt: skip


def long_grid(tmp_path: Path) -> Path:
    return write_grid(
        tmp_path, "{'SEED': [0, 1]}",
        "TRAIN_SAMPLES = 64000\nTrainConfig.checkpoint_every_samples = 320\nBATCH_SIZE = 32",
    )  # fmt: skip


@pytest.mark.slow
def test_a_sweep_passes_a_stop_signal_on_to_its_running_cell(tmp_path, tiny_data):
    """The signal reaches the sweep's process alone (``kill PID``): the cell is not orphaned."""
    sweep = tmp_path / "sweep"
    proc = started(sweep_argv(long_grid(tmp_path), sweep, tiny_data))
    wait_for(lambda: (sweep / "sweep.json").exists() and logged(cell_dirs(sweep)[0]), 180)
    first, second = cell_dirs(sweep)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "sweep stopped by SIGTERM" in err and "1 interrupted, 1 not started" in err
    status = read(first / "status.json")
    assert status["status"] == "interrupted" and "SIGTERM" in status["reason"]
    assert not pid_alive(status["pid"])  # the cell's process ended with the sweep
    assert not second.exists()
    assert read(sweep / "results.json")["status"] == {
        first.name: "interrupted",
        second.name: "not started",
    }


@pytest.mark.slow
def test_a_cell_whose_sweep_is_killed_stops_instead_of_training_on_as_an_orphan(
    tmp_path, tiny_data
):
    sweep = tmp_path / "sweep"
    proc = started(sweep_argv(long_grid(tmp_path), sweep, tiny_data))
    wait_for(lambda: (sweep / "sweep.json").exists() and logged(cell_dirs(sweep)[0]), 180)
    proc.kill()  # the sweep's process alone, without a chance to pass anything on
    proc.wait()
    first = cell_dirs(sweep)[0]
    wait_for(lambda: read(first / "status.json")["status"] == "interrupted", 60)
    wait_for(lambda: not pid_alive(read(first / "status.json")["pid"]), 60)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # a zombie has ended; only its parent has not read its exit yet


@pytest.mark.slow
def test_one_trainer_per_run_directory(tmp_path, tiny_data):
    """A second trainer in a directory in use is refused by name and pid; a sweep rerun leaves
    such a cell to its trainer; once that trainer is killed, the lock is taken over."""
    path = long_grid(tmp_path)
    sweep = tmp_path / "sweep"
    first_sweep = started(sweep_argv(path, sweep, tiny_data))
    wait_for(lambda: (sweep / "sweep.json").exists() and logged(cell_dirs(sweep)[0]), 180)
    first, second = cell_dirs(sweep)
    trainer = read(first / "status.json")["pid"]
    os.kill(first_sweep.pid, signal.SIGSTOP)  # the sweep itself hangs; its cell trains on
    try:
        cell = [
            sys.executable,
            "-m",
            "harness.run",
            "--plan",
            str(sweep / "plan.json"),
            "--cell",
            first.name,
            "--resume",
        ]  # what a second sweep runs for that cell
        again = subprocess.run(cell, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert again.returncode == 2
        assert (
            again.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: {first} is in use by another process (pid {trainer} on ")
        ), again.stderr[-2000:]
        rerun = subprocess.run(
            [*sweep_argv(path, sweep, tiny_data), "--gin_param", "SEED=0"], cwd=REPO,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"busy, another process trains it (pid {trainer} on" in rerun.stdout
        assert read(first / "status.json")["status"] == "running"  # its trainer's, untouched
    finally:
        os.killpg(first_sweep.pid, signal.SIGKILL)  # the trainer dies holding the lock
        first_sweep.wait()
    wait_for(lambda: not pid_alive(trainer))
    assert not second.exists()
    from harness.rundir import RunDir

    # the kernel lets go of it once the last thread of the holder has ended: the next one takes it
    wait_for(lambda: RunDir(first).holder() is None, 10)
    assert f"left 'running' by pid {trainer}" in RunDir(first).stale()


@pytest.mark.slow
def test_a_dead_runs_running_status_is_recognised_and_said(tmp_path, tiny_data):
    """kill -9: status.json still says running; the resume says whose it was, and the metrics
    logged after the last checkpoint are dropped so that every step is in them once."""
    out = tmp_path / "run"
    argv = smoke(out, tiny_data, "--gin_param", "TrainConfig.checkpoint_every_samples=320",
                 "--gin_param", "Faults.spec='exit@17'")  # fmt: skip
    died = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert died.returncode == 9  # os._exit at step 17: like the OOM killer
    status = read(out / "status.json")
    assert status["status"] == "running" and steps_of(out) == [5, 10, 15]
    assert checkpoint.load(checkpoint.latest(out))["step"] == 10

    from harness.rundir import RunDir

    assert f"left 'running' by pid {status['pid']}" in RunDir(out).stale()
    resumed = subprocess.run([*argv[:-2], "--resume"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"note: {out} was left 'running' by pid {status['pid']}" in resumed.stderr
    assert "resuming from its checkpoint" in resumed.stderr
    assert steps_of(out) == [5, 10, 15, 20]  # step 15 once, from the resumed run
    assert RunDir(out).stale() is None


def fake_slurm(bin_dir: Path, log: Path) -> dict[str, str]:
    """``srun`` that runs its task in place (its pid then receives what srun would forward)
    and ``scontrol`` that names the node and records a requeue."""
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
        f'else echo "$@" >> {log}; fi\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
        "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77",
        "SLURM_ARRAY_JOB_ID": "76", "SLURM_ARRAY_TASK_ID": "0", "MASTER_PORT": str(free_port()),
    }  # fmt: skip


@pytest.mark.slow
def test_slurms_notice_checkpoints_the_cell_and_requeues_it(tmp_path, tiny_data):
    path = write_grid(
        tmp_path, "{'SEED': [0]}",
        "TRAIN_SAMPLES = 64000\nGrid.launcher = 'slurm'\nGrid.slurm_signal_seconds = 90",
    )  # fmt: skip
    sweep = tmp_path / "sweep"
    planned = subprocess.run(sweep_argv(path, sweep, tiny_data), cwd=REPO, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-2000:]
    script = sweep / "slurm" / "cells.sbatch"
    assert "#SBATCH --signal=B:USR1@90" in script.read_text()
    requeued = tmp_path / "requeued.txt"
    env = {**os.environ, **fake_slurm(tmp_path / "bin", requeued)}
    job = started(["bash", str(script)], env=env)
    cell = cell_dirs(sweep)[0]
    wait_for(lambda: logged(cell), 180)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends the batch script
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    status = read(cell / "status.json")
    assert status["status"] == "interrupted" and "SIGTERM" in status["reason"], status
    assert checkpoint.load(checkpoint.latest(cell))["step"] == status["step"]
    assert requeued.read_text().split() == ["requeue", "76_0"]


@pytest.mark.slow
def test_a_sweep_killed_at_random_points_ends_as_if_undisturbed(tmp_path, tiny_data):
    """SIGKILL to everything, or SIGTERM to the group, at bounded random points of a run,
    again and again: every cell's eval.json equals the undisturbed sweep's, byte for byte."""
    path = write_grid(
        tmp_path, "{'METHOD': ['clip', 'superclip']}",
        "TRAIN_SAMPLES = 960\nBATCH_SIZE = 32\nTrainConfig.deterministic = True\n"
        "TrainConfig.checkpoint_every_samples = 160\nTrainConfig.log_every_steps = 5",
    )  # fmt: skip
    calm = subprocess.run(sweep_argv(path, tmp_path / "calm", tiny_data), cwd=REPO,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert calm.returncode == 0, calm.stderr[-2000:]
    sweep, rng, kills = tmp_path / "chaos", random.Random(25), []
    for attempt in range(12):
        proc = started(sweep_argv(path, sweep, tiny_data))
        if attempt < 8:  # then left to finish
            try:
                proc.wait(timeout=rng.uniform(3.0, 12.0))
            except subprocess.TimeoutExpired:
                kind = [signal.SIGKILL, signal.SIGTERM][len(kills) % 2]
                os.killpg(proc.pid, kind)
                kills.append(kind.name)
        _, err = proc.communicate(timeout=400)
        if proc.returncode == 0:
            break
        assert proc.returncode in (130, -signal.SIGKILL), err[-3000:]
    assert proc.returncode == 0 and len(kills) >= 2, (kills, err[-2000:])  # both kinds
    for calm_dir, chaos_dir in zip(cell_dirs(tmp_path / "calm"), cell_dirs(sweep), strict=True):
        assert (chaos_dir / "eval.json").read_bytes() == (calm_dir / "eval.json").read_bytes()
        assert steps_of(chaos_dir) == sorted(set(steps_of(chaos_dir)))  # each step once
