"""The anchor: this harness's clip step against open_clip's own trainer on the same work.

    python -m bench.vs_open_clip [--batch-size 128] [--model tiny-vit] [--rounds 3]

The same model config (``open_clip.add_model_config(configs/models)`` makes ``tiny-vit`` known
to open_clip), the same images and captions (a png + txt copy of the built-in train shards,
which open_clip's webdataset loader reads), the same batch, loader worker count, learning-rate
settings and logging interval, trained by ``open_clip_train.main`` (unmodified; its loader is
wrapped only to timestamp each batch request) and by ``harness.trainer.Trainer.fit`` for method
clip. Each trainer runs in its own fresh process, interleaved A B A B ... for ``--rounds``
rounds; warm-up steps are excluded; the answer is the median over rounds of
(open_clip's median step time / the harness's), > 1 meaning the harness is faster.

open_clip's trainer builds a plain ``torch.optim.AdamW`` (per-tensor loop on CPU, foreach on
CUDA) and offers no fused one, while the harness uses fused AdamW; so open_clip runs twice per
round: as shipped (``open_clip``) and with ``torch.optim.AdamW(fused=True)`` put in place of its
optimiser class (``open_clip_fused``), the like-for-like comparison. Every other difference that
could not be removed is listed in the output (``DIFFERENCES``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import webdataset as wds

from bench.measure import load_average, machine, now, summarise_ms
from harness import models
from harness.data.loader import resolve_manifest
from harness.data.samples import IMAGE_KEYS, sample_meta
from harness.errors import report_errors
from harness.files import write_json_atomic
from harness.manifest import Manifest
from harness.specs import DataConfig

SIDES = ("open_clip", "open_clip_fused", "harness")
DIFFERENCES = (
    "images: open_clip crops, resizes, converts to float and normalises in its loader workers "
    "(torchvision RandomResizedCrop scale 0.9-1, bicubic); the harness crops and resizes to "
    "uint8 in its workers and normalises in the training process (prepare_batch)",
    "captions: the harness draws one of each image's 2 captions per visit; open_clip reads the "
    "first one (its webdataset loader takes one txt per sample)",
    "optimiser: open_clip's stock AdamW (per-tensor loop on CPU) in `open_clip`, fused AdamW "
    "patched in for `open_clip_fused`; the harness always uses fused AdamW",
    "logging: both every 10 steps with TensorBoard; the harness also writes metrics.jsonl, keeps "
    "its loss meter on the device and shows a tqdm bar",
    "schedules: both linear warm-up then cosine (different code, one scalar per step)",
    "loader priority: the harness's workers run at nice 19 (DataConfig.worker_nice) so they use "
    "the CPU its step leaves idle; open_clip's run at the training process's priority",
    "logit scale: open_clip clamps to [0, ln 100], the harness to <= ln 100",
    "sample order: each loader shuffles its own way (same shards, same shuffle-buffer scale)",
    "open_clip_train 3.3.0 with webdataset 1.0.2 stops at the first shard boundary (KeyError "
    "'fname' on webdataset's end-of-shard marker); the end-of-shard marker is switched off "
    "(bench.vs_open_clip.open_clip_compat), nothing else in open_clip is changed",
)


# ---------------------------------------------------------------- data: png + txt shards


def convert_for_open_clip(
    manifest: Manifest, out: Path, *, num_samples: int, min_shards: int
) -> str:
    """Copy enough train shards as png + txt samples (the first caption) for open_clip's loader.

    Returns open_clip's ``--train-data`` brace pattern. Idempotent: finished shards are kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for info, path in zip(
        manifest.split("train").shards, manifest.shard_paths("train"), strict=True
    ):
        if sum(sizes.values()) >= num_samples and len(sizes) >= min_shards:
            break
        name = Path(path).name
        target = out / name
        if not target.exists():
            _convert_shard(Path(path), target)
        sizes[name] = info.num_samples
    if sum(sizes.values()) < num_samples or len(sizes) < min_shards:
        raise ValueError(
            f"{manifest.root}: {sum(sizes.values())} train samples in {len(sizes)} shards; "
            f"need {num_samples} samples and {min_shards} shards"
        )
    (out / "sizes.json").write_text(json.dumps(sizes))
    names = sorted(sizes)
    return str(out / names[0]) if len(names) == 1 else _brace(out, names)


def _brace(folder: Path, names: list[str]) -> str:
    """open_clip's shard list syntax: ``folder/{a.tar,b.tar}`` (braceexpand)."""
    return str(folder / ("{" + ",".join(names) + "}"))


def _convert_shard(source: Path, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0) as sink:
        for sample in wds.tarfile_samples([{"url": str(source)}]):
            image_ext = next((e for e in IMAGE_KEYS if e in sample), None)
            captions = sample_meta(sample)["captions"]
            if image_ext is None or not captions:
                continue
            sink.write(
                {"__key__": sample["__key__"], image_ext: sample[image_ext], "txt": captions[0]}
            )
    os.replace(tmp, target)


# ---------------------------------------------------------------- the two workers


def open_clip_compat() -> None:
    """Let open_clip_train 3.3.0 read past the end of a shard with webdataset 1.0.2.

    webdataset 1.0 yields an end-of-shard marker ``{}`` from ``tar_file_expander`` that
    open_clip_train's own ``group_by_keys_nothrow`` does not expect (KeyError 'fname' at the
    first shard boundary). Asking for the pre-1.0 behaviour (no marker) is the only change.
    """
    from open_clip_train import data as oc_data
    from webdataset.tariterators import tar_file_expander

    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


class _TimedLoader:
    """open_clip's dataloader with a timestamp (after a device sync) at every batch request;
    the interval between two requests is one training step, data wait included."""

    def __init__(self, loader, stamps: list[float], device: torch.device):
        self.loader, self.stamps, self.device = loader, stamps, device
        self.num_batches, self.num_samples = loader.num_batches, loader.num_samples

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            self.stamps.append(now(self.device))
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch


def open_clip_worker(opts: dict[str, Any]) -> list[float]:
    """Train with ``open_clip_train.main`` as shipped; return the per-step durations (s)."""
    import open_clip
    from open_clip_train import main as oc_main

    open_clip.add_model_config(str(models.MODEL_DIR))
    open_clip_compat()
    device = torch.device(opts["device"])
    stamps: list[float] = []
    original_get_data = oc_main.get_data

    def get_data(*a, **k):
        data = original_get_data(*a, **k)
        data["train"].dataloader = _TimedLoader(data["train"].dataloader, stamps, device)
        return data

    oc_main.get_data = get_data
    if opts["fused"]:  # open_clip's optimiser, as its own code builds it, but fused
        oc_main.optim = SimpleNamespace(AdamW=functools.partial(torch.optim.AdamW, fused=True))
    oc_main.main(opts["argv"])
    return [b - a for a, b in itertools.pairwise(stamps)]


def open_clip_argv(opts: dict[str, Any], logs: Path, name: str) -> list[str]:
    steps, batch = opts["warmup"] + opts["steps"], opts["batch_size"]
    train = opts["train"]
    return [
        "--train-data", opts["train_data"], "--dataset-type", "webdataset",
        "--train-num-samples", str(steps * batch), "--batch-size", str(batch), "--epochs", "1",
        "--workers", str(opts["workers"]), "--model", opts["model"],
        "--precision", "amp_bf16" if opts["device"].startswith("cuda") else "fp32",
        "--device", opts["device"], "--lr", str(train["scaled_lr"]), "--wd", str(train["weight_decay"]),
        "--beta1", str(train["beta1"]), "--beta2", str(train["beta2"]), "--eps", str(train["eps"]),
        "--warmup", str(train["warmup_steps"]), "--seed", str(train["seed"]),
        "--log-every-n-steps", str(train["log_every_steps"]), "--report-to", "tensorboard",
        "--logs", str(logs), "--name", name,
    ]  # fmt: skip


def harness_worker(opts: dict[str, Any], workdir: Path) -> list[float]:
    """``Trainer.fit`` for method clip, built as a run builds it; per-step durations (s)."""
    from bench.cell import build_cell, cell_bindings

    bindings = cell_bindings(
        "clip", opts["batch_size"], model=opts["model"], steps=opts["warmup"] + opts["steps"],
        workdir=workdir, extra=[f"DataConfig.num_workers = {opts['workers']}"],
    )  # fmt: skip
    cell = build_cell(bindings, run_dir=workdir / "run")
    stamps: list[float] = []
    cell.trainer.on_step = lambda step: stamps.append(now(cell.device))
    try:
        start = now(cell.device)
        cell.trainer.fit()
    finally:
        cell.trainer.close()
    stamps.insert(0, start)
    return [b - a for a, b in itertools.pairwise(stamps)]


def worker_main(side: str, opts: dict[str, Any], out: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"vs-{side}-") as tmp:
        if side == "harness":
            durations = harness_worker(opts, Path(tmp))
        else:
            oc = {**opts, "fused": side == "open_clip_fused"}
            oc["argv"] = open_clip_argv(oc, Path(tmp) / "logs", side)
            durations = open_clip_worker(oc)
    timed = durations[opts["warmup"] :]
    out.write_text(json.dumps({"side": side, "durations_s": timed, **summarise_ms(timed)}))


# ---------------------------------------------------------------- the interleaved comparison


def harness_train_settings(batch_size: int, model: str) -> dict[str, Any]:
    """The learning-rate and logging settings a harness clip run at this batch uses."""
    from harness import config

    config.parse(["configs/base.gin"], [f"BATCH_SIZE = {batch_size}", f"MODEL = '{model}'"])
    spec = config.resolve()
    models.model_config(model)  # an unknown name is refused here, not inside a worker
    t = spec.train
    return {
        "scaled_lr": t.scaled_lr, "weight_decay": t.weight_decay, "beta1": t.beta1,
        "beta2": t.beta2, "eps": t.eps, "warmup_steps": t.warmup_steps, "seed": t.seed,
        "log_every_steps": t.log_every_steps, "num_workers": spec.data.num_workers,
    }  # fmt: skip


def run_round(sides: list[str], opts: dict[str, Any], tmp: Path, round_index: int) -> dict:
    results = {}
    for side in sides:
        out = tmp / f"{side}-{round_index}.json"
        cmd = [sys.executable, "-m", "bench.vs_open_clip", "--worker", side,
               "--worker-opts", json.dumps(opts), "--worker-out", str(out)]  # fmt: skip
        before = load_average()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} worker failed:\n{done.stderr[-3000:]}")
        results[side] = {**json.loads(out.read_text()), "load_avg_before": before}
        print(f"round {round_index} {side}: {results[side]['median_ms']:.1f} ms", file=sys.stderr)
    return results


def summarise(rounds: list[dict[str, dict]], sides: list[str]) -> dict[str, Any]:
    ratios = {
        side: [r[side]["median_ms"] / r["harness"]["median_ms"] for r in rounds]
        for side in sides
        if side != "harness"
    }
    pooled = {
        side: summarise_ms([d for r in rounds for d in r[side]["durations_s"]]) for side in sides
    }
    return {
        "ratio_median": {side: statistics.median(v) for side, v in ratios.items()},
        "ratio_per_round": ratios,
        "pooled_step_ms": pooled,
    }


def markdown(header: dict[str, Any], summary: dict[str, Any], rounds: list[dict]) -> str:
    lines = [
        "# Harness clip step vs open_clip's trainer",
        "",
        f"- date: {header['date']}; device: {header['device_name']}; {header['cpu_cores']} CPU "
        f"cores; torch {header['torch']} ({header['torch_threads']} threads); open_clip "
        f"{header['open_clip']}",
        f"- model {header['model']}, batch {header['batch_size']}, {header['workers']} loader "
        f"worker(s); {header['warmup']} warm-up steps excluded, {header['steps']} timed; "
        f"{header['rounds']} interleaved rounds, each trainer in a fresh process",
        "- ratio = open_clip's median step time / the harness's (> 1: the harness is faster); "
        "median over rounds",
        "",
        "| trainer | step ms median [p10, p90] (pooled) | samples/s | ratio to harness (per round) |",
        "|---|---|---|---|",
    ]
    for side, pooled in summary["pooled_step_ms"].items():
        per_round = summary["ratio_per_round"].get(side)
        ratio = (
            f"**{summary['ratio_median'][side]:.3f}** ({', '.join(f'{x:.3f}' for x in per_round)})"
            if per_round
            else "1"
        )
        sps = header["batch_size"] / pooled["median_ms"] * 1000
        lines.append(
            f"| {side} | {pooled['median_ms']:.1f} [{pooled['p10_ms']:.1f}, {pooled['p90_ms']:.1f}]"
            f" | {sps:.0f} | {ratio} |"
        )
    lines += ["", "Load average (1 min) before each run: "
              + ", ".join(f"{s}: {r[s]['load_avg_before'][0]:.2f}" for r in rounds for s in r
                          if r[s].get('load_avg_before'))]  # fmt: skip
    lines += ["", "Differences that remain:", *(f"- {d}" for d in DIFFERENCES)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vs_open_clip", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--batch-size", type=int, default=128)
    add("--model", default="tiny-vit")
    add("--warmup", type=int, default=5)
    add("--steps", type=int, default=30)
    add("--rounds", type=int, default=3)
    add("--workers", type=int, default=None, help="loader workers (default: the harness's)")
    add("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    add("--workdir", type=Path, default=Path("runs/bench/vs_open_clip"), help="converted data")
    add("--out", type=Path, default=None, help="default reports/bench/vs_open_clip-<time>")
    add("--worker", choices=SIDES, help=argparse.SUPPRESS)
    add("--worker-opts", help=argparse.SUPPRESS)
    add("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.worker_opts), args.worker_out)
        return 0
    sides = [s for s in SIDES if s in args.sides and s != "harness"] + ["harness"]
    with report_errors():
        train = harness_train_settings(args.batch_size, args.model)
    workers = train["num_workers"] if args.workers is None else args.workers
    manifest = resolve_manifest(DataConfig())
    steps = args.warmup + args.steps
    train_data = convert_for_open_clip(
        manifest, args.workdir / "data", num_samples=2 * steps * args.batch_size,
        min_shards=max(1, workers),
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = {"batch_size": args.batch_size, "model": args.model, "warmup": args.warmup,
            "steps": args.steps, "workers": workers, "train": train, "train_data": train_data,
            "device": device}  # fmt: skip
    rounds = []
    with tempfile.TemporaryDirectory(prefix="vs-open-clip-") as tmp:
        for r in range(args.rounds):
            rounds.append(run_round(sides, opts, Path(tmp), r))
    summary = summarise(rounds, sides)
    header = {**machine(torch.device(device)), "model": args.model, "batch_size": args.batch_size,
              "workers": workers, "warmup": args.warmup, "steps": args.steps,
              "rounds": args.rounds}  # fmt: skip
    out = args.out or Path("reports/bench") / f"vs_open_clip-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"header": header, "summary": summary,
                                             "rounds": rounds, "differences": DIFFERENCES})  # fmt: skip
    (out / "results.md").write_text(markdown(header, summary, rounds))
    print(out / "results.md")
    print(json.dumps(summary["ratio_median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
