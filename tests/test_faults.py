"""Faults survived: OOM and crashed workers recorded, clean stops on signals, atomic writes under
kill -9, incompatible resumes and untrusted run directories refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from harness.metrics import read_metrics
from tests.conftest import REPO, run_cli
from tests.test_grid import cell_dirs, read, write_grid

MICRO = ["--gin_param", "MODEL='micro-vit'", "--gin_param", "TrainConfig.progress_bar=False",
         "--gin_param", "EvalConfig.probe_train_samples=100"]  # fmt: skip


def smoke(out, tiny_data, *extra):
    return [sys.executable, "-m", "harness.run", "configs/smoke.gin", "--out", str(out),
            "--gin_param", f"DATA='{tiny_data}'", *MICRO, *extra]  # fmt: skip


@pytest.mark.slow
def test_oom_marks_the_cell_oom_and_the_sweep_continues(tmp_path, tiny_data):
    path = write_grid(tmp_path, "{'Faults.spec': ['oom@3', '']}")
    sweep = tmp_path / "sweep"
    done = run_cli(
        "harness.run", str(path), "--out", str(sweep), "--gin_param", f"DATA='{tiny_data}'"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    oom, fine = cell_dirs(sweep)
    status = read(f"{oom}/status.json")
    assert (
        status["status"] == "oom"
        and status["step"] == 3
        and "injected out-of-memory" in status["reason"]
    )
    assert read(f"{fine}/status.json")["status"] == "finished"


@pytest.mark.slow
@pytest.mark.dist
def test_a_crashed_torchrun_worker_marks_the_cell_failed_with_the_log_tail(tmp_path, tiny_data):
    path = write_grid(
        tmp_path,
        "{'Faults.spec': ['crash@2@1']}",
        "Grid.nproc_per_node = 2\nRunConfig.device = 'cpu'",
    )
    sweep = tmp_path / "sweep"
    done = run_cli(
        "harness.run", str(path), "--out", str(sweep), "--gin_param", f"DATA='{tiny_data}'"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (cell,) = cell_dirs(sweep)
    status = read(f"{cell}/status.json")
    assert status["status"] == "failed" and status["exit_code"] != 0
    assert any("injected crash at step 2 on rank 1" in line for line in status["errors"])
    assert status["log_tail"]  # and the end of the log, torchrun's own summary


@pytest.mark.slow
def test_two_ranks_resume_past_corrupt_samples_as_if_never_stopped(tmp_path, tiny_data):
    """Rank 1 crashes after the step-20 checkpoint; the rerun resumes both ranks' loader workers
    at their own positions (corrupt samples included) and ends with the uninterrupted weights."""
    data = tmp_path / "data"
    copy_with_broken_pngs(tiny_data, data, "train")
    extra = (
        "Grid.nproc_per_node = 2\nRunConfig.device = 'cpu'\nBATCH_SIZE = 32\n"
        "TRAIN_SAMPLES = 960\nTrainConfig.checkpoint_every_samples = 640\n"
        "TrainConfig.deterministic = True"
    )
    path = write_grid(tmp_path, "{'SEED': [0]}", extra)
    argv = ["harness.run", str(path), "--gin_param", f"DATA='{data}'"]
    straight = run_cli(*argv, "--out", str(tmp_path / "straight"), timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = tmp_path / "stopped"
    crashed = run_cli(*argv, "--out", str(stopped), env={"CLIPBENCH_FAULT": "crash@25@1"})
    assert crashed.returncode == 0, crashed.stderr[-2000:]
    (cell,) = cell_dirs(stopped)
    saved = checkpoint.load(checkpoint.latest(cell))
    assert saved["step"] == 20 and saved["corrupt_samples"] > 0
    assert len(saved["data_position"]["reader_samples"]) == 2  # one row per rank
    rerun = run_cli(*argv, "--out", str(stopped), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read(f"{cell}/status.json")["status"] == "finished"
    (straight_cell,) = cell_dirs(tmp_path / "straight")
    a = checkpoint.load(checkpoint.latest(straight_cell))["model"]
    b = checkpoint.load(checkpoint.latest(cell))["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_exits_cleanly(tmp_path, tiny_data, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(smoke(out, tiny_data, "--gin_param", "TRAIN_SAMPLES=64000"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(
        lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0
    )
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    status = read(out / "status.json")
    assert status["status"] == "interrupted" and signal.Signals(sig).name in status["reason"]
    assert checkpoint.load(checkpoint.latest(out))["step"] == status["step"]


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_last_good_one(tmp_path, tiny_data):
    out = tmp_path / "run"
    argv = smoke(out, tiny_data, "--gin_param", "TrainConfig.checkpoint_every_samples=160")
    # steps of 32 samples: checkpoints at steps 5, 10, 15; the write at step 10 stalls
    proc = subprocess.Popen([*argv, "--gin_param", "Faults.spec='slow_checkpoint@10'"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    wait_for(
        lambda: (
            list((out / "checkpoints").glob(".latest.pt.*.tmp")) and checkpoint.latest(out).exists()
        )
    )
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(checkpoint.latest(out))["step"] == 5  # the last complete checkpoint
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [5, 10]
    for name in ("status.json", "run.json", "costs.json"):
        json.loads((out / name).read_text())  # every result file parses
    resumed = subprocess.run(
        [*argv, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read(out / "status.json")["status"] == "finished"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_data):
    """A run that crashed at step 3 after checkpointing at step 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    argv = smoke(out, tiny_data, "--gin_param", "TrainConfig.checkpoint_every_samples=64",
                 "--gin_param", "Faults.spec='crash@3'")  # fmt: skip
    subprocess.run(argv, cwd=REPO, capture_output=True, timeout=300)
    assert read(out / "status.json")["status"] == "failed"
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("binding", "message", "with_config"),
    [
        # the run's own config.gin is compared first (Faults.spec and the checkpoint interval,
        # which differ here too, cannot change results and are not reported)
        (
            "MODEL='tiny-vit'",
            r"another config.*\n  - MODEL = 'micro-vit'\n  \+ MODEL = 'tiny-vit'\nchoose",
            True,
        ),
        (
            "BATCH_SIZE=64",
            r"another config.*\n  - BATCH_SIZE = 32\n  \+ BATCH_SIZE = 64\nchoose",
            True,
        ),
        # a checkpoint without its config.gin: the checkpoint itself is checked
        ("MODEL='tiny-vit'", "model does not match this run's model: .*shape mismatch", False),
        ("BATCH_SIZE=64", "saved with batch_size=32, this run has batch_size=64", False),
    ],
)
def test_an_incompatible_checkpoint_is_refused_with_what_differs(
    stopped_run, tiny_data, tmp_path, binding, message, with_config
):
    import re

    out = tmp_path / "copy"
    shutil.copytree(stopped_run, out)
    if not with_config:
        (out / "config.gin").unlink()
    # a later binding overrides the earlier one of the same macro
    argv = [*smoke(out, tiny_data), "--gin_param", binding, "--resume"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr[-1500:]


def test_a_checkpoint_of_another_world_size_is_refused(stopped_run, tiny_data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(stopped_run, out)
    (out / "config.gin").unlink()  # the checkpoint itself is checked
    state = checkpoint.load(checkpoint.latest(out))
    checkpoint.save(checkpoint.latest(out), {**state, "world_size": 2})
    argv = [*smoke(out, tiny_data), "--resume"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-1500:]
    assert "saved with world_size=2, this run has world_size=1" in done.stderr


def test_resuming_without_resume_flag_is_refused(stopped_run, tiny_data):
    done = subprocess.run(
        smoke(stopped_run, tiny_data), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "pass --resume" in done.stderr


def test_checkpoints_never_unpickle_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(path)


def test_gin_imports_in_a_run_directory_are_refused(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"method": "clip", "model_config": {}}))
    (tmp_path / "operative_config.gin").write_text("import os\nRunConfig.method = 'clip'\n")
    done = run_cli("harness.evaluate", str(tmp_path))
    assert done.returncode == 2 and "line 1: refusing a gin import statement" in done.stderr


def test_bad_fault_spec_is_a_config_error(tiny_data, tmp_path):
    done = subprocess.run([*smoke(tmp_path / "r", tiny_data), "--gin_param", "Faults.spec='melt@3'"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "fault 'melt@3'" in done.stderr


def copy_with_broken_pngs(tiny_data, data, split: str) -> int:
    """A copy of the dataset whose first ``split`` shard has every 10th PNG truncated
    (undecodable); returns how many were broken."""
    import io
    import tarfile
    from dataclasses import replace

    from harness.files import sha256_file
    from harness.manifest import load_manifest, save_manifest

    shutil.copytree(tiny_data.parent, data)
    manifest = load_manifest(data)
    shard = manifest.splits[split].shards[0]
    members, broken = [], 0
    with tarfile.open(data / shard.path) as tar:
        for m in tar.getmembers():
            payload = tar.extractfile(m).read()
            if m.name.endswith(".png") and int(m.name.split(".")[0]) % 10 == 0:
                payload, broken = payload[:40], broken + 1  # a truncated PNG: undecodable
            members.append((m.name, payload))
    with tarfile.open(data / shard.path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    new_shard = replace(shard, sha256=sha256_file(data / shard.path))
    shards = [new_shard, *manifest.splits[split].shards[1:]]
    splits = {**manifest.splits, split: replace(manifest.splits[split], shards=shards)}
    save_manifest(replace(manifest, splits=splits), data)
    return broken


@pytest.mark.slow
def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, tiny_data):
    data = tmp_path / "data"
    copy_with_broken_pngs(tiny_data, data, "train")

    out = tmp_path / "run"
    done = subprocess.run(
        [a if not a.startswith("DATA=") else f"DATA='{data}'" for a in smoke(out, tiny_data, "--gin_param", "TRAIN_SAMPLES=1600")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    corrupt = read(out / "throughput.json")["corrupt_samples"]
    # 5 broken samples per pass over the shard; 1,600 samples seen is about 4 passes over the
    # 395 good ones, and the shuffle buffer spreads the boundaries, so 3 to 5 passes are counted
    assert 3 * 5 <= corrupt <= 5 * 5
    assert read_metrics(out / "metrics.jsonl")[-1]["corrupt_samples"] == corrupt
    assert Path(out / "eval.json").exists()


def test_a_missing_teacher_checkpoint_is_refused_before_any_work(tiny_data, tmp_path):
    out = tmp_path / "student"
    argv = [*smoke(out, tiny_data), "--gin_param", "METHOD='siclip'",
            "--gin_param", f"siclip.teacher='{tmp_path}/no/such/run'"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no/such/run' is not a run directory of this harness" in done.stderr
    assert "In call to configurable" not in done.stderr and not out.exists()


def test_corrupt_test_samples_are_skipped_and_counted_by_the_evaluator(tmp_path, tiny_data):
    from harness import models
    from harness.evaluator import evaluate
    from harness.manifest import load_manifest
    from harness.specs import EvalConfig
    from tests.dist_utils import build

    data = tmp_path / "data"
    broken = copy_with_broken_pngs(tiny_data, data, "test")
    manifest = load_manifest(data)
    cfg = models.model_config("micro-vit")
    step = build("clip", cfg, [])
    metrics, _ = evaluate(
        step.method, step.model, manifest, EvalConfig(batch_size=16, probe_train_samples=0),
        image_size=models.image_size(cfg), context_length=models.context_length(cfg),
        device=torch.device("cpu"),
    )  # fmt: skip
    total = manifest.splits["test"].num_samples
    assert broken > 0 and metrics["num_test_corrupt"] == broken
    assert metrics["num_test_images"] == total - broken


def test_a_failed_evaluation_is_recorded_not_left_running(tmp_path, tiny_data, monkeypatch):
    from harness import execute
    from harness.run import run_config

    def broken(*args, **kwargs):
        raise RuntimeError("no test split today")

    monkeypatch.setattr(execute, "evaluate_into", broken)
    bindings = [f"DATA='{tiny_data}'", "MODEL='micro-vit'", "TRAIN_SAMPLES=64",
                "TrainConfig.progress_bar=False"]  # fmt: skip
    with pytest.raises(RuntimeError, match="no test split today"):
        run_config([REPO / "configs/smoke.gin"], bindings, out=tmp_path / "run")
    status = read(tmp_path / "run" / "status.json")
    assert status["status"] == "failed" and status["step"] == 2
    assert status["reason"] == "evaluation: RuntimeError: no test split today"
    assert checkpoint.latest(tmp_path / "run").exists()  # the trained weights are kept
    speed = read(tmp_path / "run" / "throughput.json")
    monkeypatch.undo()

    # resumed: no step is left, so the throughput measured in training stays as it was
    run_config([REPO / "configs/smoke.gin"], bindings, out=tmp_path / "run", resume=True)
    assert read(tmp_path / "run" / "throughput.json") == speed
    assert read(tmp_path / "run" / "status.json")["status"] == "finished"

    # or evaluated on its own (python -m harness.evaluate): that finishes it too
    from harness.evaluate import evaluate_run_dir
    from harness.rundir import RunDir

    RunDir(tmp_path / "run").write_status("failed", reason="evaluation: RuntimeError: x", step=2)
    assert "i2t_r1" in evaluate_run_dir(tmp_path / "run")
    assert read(tmp_path / "run" / "status.json")["status"] == "finished"


@pytest.mark.parametrize("write", ["harness", "report"])
def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch, write):
    from harness.files import write_text_atomic
    from reports.report import _replace

    path = tmp_path / "operative_config.gin"
    path.write_text("old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        (write_text_atomic if write == "harness" else _replace)(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name != "operative_config.gin"] in (
        [],
        [".operative_config.gin.partial"],
    )
