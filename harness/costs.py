"""Parameter and FLOP counts of a method's training step and of its inference embeddings.

FLOPs are counted with torch's FlopCounterMode (matmuls, convolutions, attention; elementwise
ops are not counted, as is usual for MFU) on a copy of the model and method, so that counting
changes no weight, buffer or optimiser state. Everything a method adds (heads, prototypes,
projections, a frozen teacher's forward) is inside the counted step; with
``TrainConfig.grad_checkpointing`` so is the recomputed forward (hardware, not model, FLOPs).
Parameter counts are of distinct parameters (shared weights count once); a method's frozen
modules are counted as frozen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness import distributed
from harness.data.loader import prepare_batch
from harness.files import write_json_atomic


class _NoModuleTracking:
    """Stands in for FlopCounterMode's per-module tracker: only the total is used here.

    The tracker's backward hooks keep every recomputed activation of a grad-checkpointed model
    alive, so counting took nearly the memory of no checkpointing at all (measured: ViT-B/32 at
    batch 64 on the CPU, 3.8 GB peak growth against 1.6 GB without it; ViT-L/14 at batch 512 on
    an H100, 77.2 GiB, where the training step itself peaks at 14.9 GiB).
    """

    parents = ("Global",)

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def total_flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts the total only (its ``get_total_flops``)."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):  # the tracker of the torch versions used here (2.11, 2.14)
        counter.mod_tracker = _NoModuleTracking()
    return counter


EOT_TOKEN = 49407  # CLIP BPE end-of-text id: text pooling picks the argmax id


def synthetic_batch(batch: int, image_size: int, context_length: int) -> dict[str, torch.Tensor]:
    """A batch with the shapes of a real one (FLOPs depend on shapes, not on values)."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, 49406, (batch, context_length), generator=gen)
    text[:, 0], text[:, -1] = 49406, EOT_TOKEN
    return {
        "image": torch.randint(
            0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=gen
        ),
        "text": text,
        "index": torch.arange(batch),
        "corrupt": torch.tensor(0),
    }


def parameter_counts(model: nn.Module, method: nn.Module) -> dict[str, int]:
    def count(params, trainable=None):
        return sum(p.numel() for p in params if trainable is None or p.requires_grad == trainable)

    model_ids = {id(p) for p in model.parameters()}
    extra = [p for p in method.parameters() if id(p) not in model_ids]
    # state the method optimises on its own (e.g. NeuCLIP's prototypes) counts as trainable
    learned = sum(getattr(method, name).numel() for name in method.learned_buffers)
    # modules the method runs but never trains (a teacher): frozen, and part of the total
    outside = {name: count(m.parameters()) for name, m in method.frozen_modules().items()}
    n_outside = sum(outside.values())
    return {
        "params_model": count(model.parameters()),
        "params_model_trainable": count(model.parameters(), True),
        "params_method_extra": count(extra) + learned,
        "params_method_extra_trainable": count(extra, True) + learned,
        "params_method_learned_buffers": learned,
        **{f"params_{name}": n for name, n in outside.items()},
        "params_frozen": count(model.parameters(), False) + count(extra, False) + n_outside,
        "params_trainable": count(model.parameters(), True) + count(extra, True) + learned,
        "params_total": count(model.parameters()) + count(extra) + learned + n_outside,
    }


def count_costs(
    step_module: nn.Module,
    *,
    per_rank_batch: int,
    image_size: int,
    context_length: int,
    device: torch.device,
    autocast_ctx,
) -> dict[str, Any]:
    """Parameters, training FLOPs per sample, and inference FLOPs per image and per caption."""
    counts = parameter_counts(step_module.model, step_module.method)
    twin = copy.deepcopy(step_module)
    batch = prepare_batch(synthetic_batch(per_rank_batch, image_size, context_length), device)
    warmup = twin.method.cost_warmup_steps(per_rank_batch * distributed.world_size())
    for _ in range(warmup):  # reach the method's steady state (on the copy) before counting
        with autocast_ctx:
            twin(batch)["loss"].backward()
    with total_flop_counter() as counter:
        with autocast_ctx:
            loss = twin(batch)["loss"]
        loss.backward()
    train_flops = counter.get_total_flops()
    twin.eval()
    method, model = twin.method, twin.model
    with torch.no_grad(), total_flop_counter() as counter:
        method.embed_images(model, batch["image"][:1])
    image_flops = counter.get_total_flops()
    text_flops = 0
    if method.has_text_tower(model):
        with torch.no_grad(), total_flop_counter() as counter:
            method.embed_texts(model, batch["text"][:1])
        text_flops = counter.get_total_flops()
    del twin, batch, method, model, loss
    if device.type == "cuda":
        # the count's cached blocks would otherwise stay reserved, in the run's NVML memory figure
        torch.cuda.empty_cache()
    return {
        **counts,
        "train_flops_per_sample": train_flops / per_rank_batch,
        "train_flops_batch": per_rank_batch,
        "train_flops_warmup_steps": warmup,
        "inference_flops_per_image": image_flops,
        "inference_flops_per_caption": text_flops,
    }


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, no sparsity).
DATASHEET_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU: a datasheet value for known GPUs, otherwise a
    matmul peak (fp32 on CPU, bf16 on GPU) measured once per machine and cached with its date,
    so that every sweep on one machine divides by the same number (a peak re-measured per sweep
    moved 66-168 GFLOP/s with what else ran). Delete the cache file to measure again."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DATASHEET_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} datasheet dense bf16 peak"
    return _cached_peak(device)


def cache_dir() -> Path:
    """Where per-machine measurements are kept: $CLIPBENCH_CACHE, else the XDG cache folder."""
    if os.environ.get("CLIPBENCH_CACHE"):
        return Path(os.environ["CLIPBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipbench"


def machine_key(device: torch.device) -> str:
    """What a measured peak is a peak of: the host, its processor or GPU, threads, torch."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{_cpu_model()} x{os.cpu_count()}, {torch.get_num_threads()} threads"
    return f"{platform.node()} | {what} | torch {torch.__version__}"


def _cached_peak(device: torch.device) -> tuple[float, str]:
    path = cache_dir() / "device_peak.json"
    entries = _read_cache(path)
    key = machine_key(device)
    entry = entries.get(key)
    if entry is None:
        if device.type == "cuda":
            flops, how = _measured_matmul(device, torch.bfloat16, 8192), "measured bf16 matmul peak"
        else:
            flops, how = (
                _measured_matmul(device, torch.float32, 1024),
                ("measured fp32 matmul peak (CPU, 1024x1024, best of 10)"),
            )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        entry = {"flops": flops, "how": how, "date": time.strftime("%Y-%m-%d"), "load_avg_1m": load}
        with contextlib.suppress(OSError):  # unwritable: measured again next time, said below
            write_json_atomic(path, {**entries, key: entry})
    where = f"cached in {path}" if key in _read_cache(path) else "could not be cached"
    return entry["flops"], f"{entry['how']} on {key}, measured {entry['date']} ({where})"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measured_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
