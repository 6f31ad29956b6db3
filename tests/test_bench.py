"""bench/: the throughput tool's output, the I/O-bound flag, the open_clip data copy, DDP comm timing."""

from __future__ import annotations

import argparse
import json
import os
import tarfile

import pytest
import torch

from bench import report
from bench.vs_open_clip import convert_for_open_clip, open_clip_compat
from harness.manifest import load_manifest
from tests.conftest import run_cli
from tests.dist_utils import free_port

PHASE_KEYS = {"data_wait", "prepare", "forward", "frozen_forward", "loss", "backward",
              "optimizer", "communication"}  # fmt: skip


def test_throughput_writes_documented_fields(tiny_data, tmp_path):
    out = tmp_path / "bench"
    done = run_cli(
        "bench.throughput", "--methods", "clip", "--batch-sizes", "8", "--model", "micro-vit",
        "--data", str(tiny_data), "--warmup", "1", "--steps", "3",
        "--phase-steps", "2", "--loader-batches", "2", "--out", str(out),
        "--gin_param", "DataConfig.num_workers=2",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert {"date", "torch", "torch_threads", "device_name", "peak_source"} <= set(result["header"])
    gpu = torch.cuda.is_available()  # the CUDA branch runs where a GPU is lent, never in CI
    peak_kind = "dense bf16 peak" if gpu else "measured fp32 matmul peak"
    assert peak_kind in result["header"]["peak_source"]
    clip, bare, live = result["rows"]
    assert [r["method"] for r in result["rows"]] == ["clip", "bare", "bare+loader"]
    assert clip["step"]["steps"] == 3 and clip["step"]["p10_ms"] <= clip["step"]["p90_ms"]
    assert clip["samples_per_s"] == pytest.approx(8000 / clip["step"]["median_ms"])
    assert set(clip["phases_ms"]) == PHASE_KEYS
    assert clip["phases_ms"]["communication"] is None  # one process
    assert clip["phases_ms"]["frozen_forward"] is None  # clip has no teacher
    assert clip["phases_ms"]["forward"]["median_ms"] > 0
    assert 0 < clip["mfu"] < 1 and clip["train_flops_per_sample"] > 0
    memory_kind = "cuda max_memory_allocated" if gpu else "process peak RSS"
    assert clip["memory_kind"].startswith(memory_kind) and clip["peak_memory_mb"] > 0
    if gpu:
        assert clip["gpu"]["samples"] >= 1 and clip["gpu"]["gpu_util_mean_pct"] is not None
    else:
        assert (
            clip["gpu"]["gpu_util_mean_pct"] is None and clip["gpu"]["nvml"] == "no GPU (CPU run)"
        )
    assert clip["loader"]["samples_per_s"] > 0 and isinstance(clip["io_bound"], bool)
    # 2 workers: one round of warm-up, then whole rounds, at least three (not the 2 asked for)
    assert clip["loader"]["num_workers"] == 2 and clip["loader"]["batches"] == 6
    assert bare["step"]["steps"] == 3 and "phases_ms" not in bare
    assert live["step"]["steps"] == 3 and "loader, live" in live["note"]
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    clip_line = next(line for line in table.splitlines() if line.startswith("| clip |"))
    assert header.count("|") == clip_line.count("|")
    assert "clip ÷ bare " in table and "clip ÷ bare+loader " in table
    assert "GPU util %" in header and "I/O-bound" in header
    gpu_util = clip_line.split("|")[header.split("|").index(" GPU util % ")].strip()
    assert (gpu_util != "n/a") if gpu else (gpu_util == "n/a")


def test_io_bound_flag():
    assert report.io_bound(loader_ms_per_batch=12.0, compute_ms_per_step=10.0)
    assert not report.io_bound(loader_ms_per_batch=8.0, compute_ms_per_step=10.0)
    ms = {"median_ms": 2.0}
    phases = {name: dict(ms) for name in PHASE_KEYS} | {"communication": None}
    assert report.compute_ms(phases) == 2.0 * 5  # data wait and the frozen sub-phase left out
    fast = report.derive(
        steps={"step": {"median_ms": 10.0}}, phases=phases, costs={"train_flops_per_sample": 1e6},
        loader={"ms_per_batch": 2.0, "samples_per_s": 4000.0}, peak=(1e9, "test"), batch=8,
        method_info={},
    )  # fmt: skip
    assert not fast["io_bound"] and fast["loader_speedup"] == pytest.approx(5.0)
    slow = report.derive(
        steps={"step": {"median_ms": 10.0}}, phases=phases, costs={"train_flops_per_sample": 1e6},
        loader={"ms_per_batch": 11.0, "samples_per_s": 700.0}, peak=(1e9, "test"), batch=8,
        method_info={},
    )  # fmt: skip
    assert slow["io_bound"]
    assert slow["step_excluding_frozen_ms"] == pytest.approx(8.0)
    assert slow["mfu"] == pytest.approx(1e6 * 800 / 1e9)


def _timed_row(method: str, round_: int, step_ms: float, **extra) -> dict:
    """A bench row with what the table reads, as run_cell and report.derive write it."""
    return {
        "method": method, "batch_size": 8, "round": round_, "samples_per_s": 8000 / step_ms,
        "step": {"median_ms": step_ms, "p10_ms": step_ms - 1, "p90_ms": step_ms + 1},
        "peak_memory_mb": 100.0, **extra,
    }  # fmt: skip


def test_rounds_take_each_ratio_within_a_round_and_show_the_median_round():
    # The machine is twice as slow in round 1: clip and bare both slow down, and their ratio
    # (1.10 in every round) must not see it, as it would if rounds were pooled per cell.
    rows = []
    for round_, speed in enumerate([1.0, 2.0, 1.2]):
        rows += [
            _timed_row("clip", round_, 110 * speed, loader_speedup=5.0 + round_),
            _timed_row("superclip", round_, 130 * speed + round_),
            _timed_row("siclip", round_, 150 * speed, step_excluding_frozen_ms=120 * speed),
            _timed_row("bare", round_, 100 * speed),
        ]
    rows.append({"method": "neuclip", "batch_size": 8, "round": 0, "error": "boom\nKeyError"})
    assert report.round_ratios(rows, "clip", 8, "bare") == pytest.approx([1.1, 1.1, 1.1])
    assert report.median_round(report.cell_rounds(rows)[("clip", 8)])["round"] == 2  # 132 ms
    header = {
        "date": "d", "device_name": "cpu", "cpu_cores": 2, "torch": "t", "torch_threads": 2,
        "open_clip": "o", "python": "p", "warmup_steps": 1, "timed_steps": 3,
        "peak_flops": 1e9, "peak_source": "test", "phase_steps": 1, "phases_note": "n",
        "loader_batches": 1, "rounds": 3,
    }  # fmt: skip
    table = report.markdown(header, rows)
    lines = table.splitlines()
    clip_line = next(line for line in lines if line.startswith("| clip |"))
    assert "| 132.0 [131.0, 133.0] |" in clip_line  # round 2's row, the median of 110, 220, 132
    superclip = [130 / 110, (260 + 1) / 220, (156 + 2) / 132]
    summary = next(line for line in lines if line.startswith("- batch 8:"))
    assert "clip ÷ bare 1.100 [1.100–1.100]" in summary
    assert (
        f"superclip ÷ clip {sorted(superclip)[1]:.2f} [{min(superclip):.2f}–{max(superclip):.2f}]"
        in summary
    )
    assert "siclip ÷ clip 1.36 [1.36–1.36] (1.09 [1.09–1.09] without its frozen forward)" in summary
    assert "loader ÷ clip step 6.0 [5.0–7.0]×" in summary
    assert "| neuclip | 8 | error: KeyError |" in table
    assert "3 rounds" in table and "over the 3 rounds" in table
    # one round: the table as before, plain ratios
    one = report.markdown({**header, "rounds": 1}, [r for r in rows if r.get("round") == 0])
    assert "clip ÷ bare 1.100;" in one and "[" not in one.split("- batch 8:")[1].split(";")[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "8", "0"], "TrainConfig.batch_size=0 is out of range"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--gin_param", "TrainConfig.lr=-1"], "TrainConfig.lr=-1 is out of range"),
        (["--batch-sizes", "100000"], "BATCH_SIZE=100000 is larger than the training split"),
    ],
)
def test_throughput_refuses_bad_input_before_measuring(args, message, tiny_data, tmp_path, capsys):
    """One error line, exit code 2 and no report folder, not a failed row per cell."""
    from bench import throughput

    out = tmp_path / "bench"
    base = ["--methods", "clip", "--model", "micro-vit", "--data", str(tiny_data)]
    with pytest.raises(SystemExit) as exit_info:
        throughput.main([*base, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--model", "nope"], "unknown model 'nope'"), (["--batch-size", "-3"], "out of range")],
)
def test_vs_open_clip_refuses_bad_input_before_any_work(args, message, tmp_path, capsys):
    from bench import vs_open_clip

    workdir = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_info:
        vs_open_clip.main([*args, "--workdir", str(workdir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err
    assert not workdir.exists() and not (tmp_path / "out").exists()


def test_throughput_rounds_interleave_cells_batch_by_batch(tiny_data, tmp_path):
    out = tmp_path / "bench"
    done = run_cli(
        "bench.throughput", "--methods", "clip", "--batch-sizes", "4", "8", "--model",
        "micro-vit", "--data", str(tiny_data), "--warmup", "1", "--steps", "2",
        "--phase-steps", "1", "--loader-batches", "1", "--rounds", "2", "--no-bare", "--in-process",
        "--out", str(out), env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["header"]["rounds"] == 2
    order = [(r["round"], r["method"], r["batch_size"]) for r in result["rows"]]
    assert order == [(0, "clip", 4), (0, "clip", 8), (1, "clip", 4), (1, "clip", 8)]
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| clip |") for line in table.splitlines()) == 2


def test_open_clip_reads_the_converted_shards(tiny_data, tmp_path):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    open_clip_compat()  # open_clip_train 3.3.0 + webdataset 1.0.2: see its docstring
    manifest = load_manifest(tiny_data)
    pattern = convert_for_open_clip(manifest, tmp_path, num_samples=120, min_shards=2)
    first = sorted(tmp_path.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
        caption = tar.extractfile(names[1]).read().decode()
    assert names[:2] == [names[0].split(".")[0] + ".png", names[0].split(".")[0] + ".txt"]
    source = tiny_data.parent / first.name
    with tarfile.open(source) as tar:
        meta = json.loads(tar.extractfile(names[0].split(".")[0] + ".json").read())
    assert caption == meta["captions"][0]
    _, preprocess, _ = open_clip.create_model_and_transforms("ViT-B-32", force_image_size=32)
    args = argparse.Namespace(
        train_data=pattern, train_num_samples=120, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=8, world_size=1, workers=0,
    )  # fmt: skip
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=36)
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    batches = list(data.dataloader)  # 15 batches over 3 shards: crosses shard boundaries
    assert len(batches) == 15
    images, texts = batches[-1]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert texts.shape == (8, 36) and bool((texts == 49407).any(dim=1).all())


def _comm_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.comm import CommTimer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        ddp = DistributedDataParallel(model)
        timer = CommTimer(ddp, torch.device("cpu"))
        x = torch.full((2, 4), float(rank + 1))
        grads, seconds = [], []
        for timing in (False, True):
            timer.timing = timing
            model.zero_grad()
            ddp(x).sum().backward()
            grads.append(model.weight.grad.clone())
            seconds.append(timer.pop())
        expected = torch.full((2, 4), 1.5).sum(0).expand(3, 4)  # mean of the ranks' inputs
        torch.save({"grads": grads, "seconds": seconds, "expected": expected}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_comm_timer_averages_gradients_and_times_only_when_asked(tmp_path):
    torch.multiprocessing.spawn(
        _comm_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for grad in result["grads"]:
            assert torch.allclose(grad, result["expected"])
        assert result["seconds"][0] == 0.0 and result["seconds"][1] > 0.0


def test_memory_bench_prints_both_peaks_and_refuses_custom_blocks_by_name(capsys):
    from bench import memory

    assert memory.main(["--model", "micro-vit", "--batch", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    device = (
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # the bench uses the GPU when there is one
    assert lines[0] == f"clip on micro-vit, batch 4, {device}, grad checkpointing off"
    for line, label in zip(lines[1:], ("forward + backward", "FLOP count"), strict=True):
        assert line.split()[: len(label.split())] == label.split()
        assert float(line.split("peak")[1].split("MB")[0]) > 0
    with pytest.raises(SystemExit) as exit_info:
        memory.main(["--model", "micro-vit", "--batch", "4", "--grad-checkpointing"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "CustomResidual" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_nvml_cost_bench_refuses_a_machine_without_cuda_by_saying_so(capsys):
    from bench import nvml_cost

    assert nvml_cost.main(["--rounds", "1"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_loss_micro_benchmarks_time_methods_as_runs_configure_them(tmp_path):
    """bench/test_losses.py builds each method with its configs/methods file and times it in its
    steady state: neuclip with the CPU models' 256 prototypes and a full queue (with the class's
    4,096 its loss jumped ~15x once the queue filled, mid-benchmark)."""
    import gin

    from bench.test_losses import outputs_of
    from harness import models
    from harness.step import total_loss

    try:
        method, outputs = outputs_of("neuclip", 32, models.model_config("micro-vit"), tmp_path)
        configured = gin.query_parameter("neuclip.num_prototypes")  # bound by the gin file only
    finally:
        gin.clear_config()
    assert method.num_prototypes == configured
    assert method.counts["queue_fill"] == method.num_prototypes
    assert torch.isfinite(total_loss(method.loss(outputs)))
