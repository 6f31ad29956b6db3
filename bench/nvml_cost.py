"""What NVML sampling costs the training step.

``python -m bench.nvml_cost [--model ViT-B-32] [--batch 128] [--rounds 4] [--steps 40]``

The trainer runs an ``NvmlSampler``: a Python thread that queries GPU utilisation and memory every
50 ms and so competes with the step for the GIL; during ``bench.throughput``'s timed steps the
bench runs a second one beside the trainer's. This times the bare loop (``bench.bare``: open_clip
CLIP, ClipLoss, fused AdamW, bf16 autocast, batches already on the device) with 0, 1 and 2 samplers
running, interleaved over rounds, and prints each round's median step time. A batch where the step
is bound by its host thread is the case where a sampler thread could show. CUDA only: on a CPU
there is nothing to sample.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch

from bench.bare import time_bare_loop
from harness import models
from harness.costs import synthetic_batch
from harness.data.loader import prepare_batch
from harness.errors import report_errors
from harness.hardware import NvmlSampler
from harness.step import autocast

SAMPLER_COUNTS = (0, 1, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nvml_cost", description=__doc__)
    parser.add_argument("--model", default="ViT-B-32", help="configs/models/<name> or open_clip's")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: bench.nvml_cost needs a CUDA device (NVML samples GPUs only)", file=sys.stderr
        )
        return 2

    device = torch.device("cuda")
    with report_errors():
        cfg = models.model_config(args.model)
    size, context = models.image_size(cfg), models.context_length(cfg)
    batches = []
    for _ in range(4):
        batch = prepare_batch(synthetic_batch(args.batch, size, context), device)
        batches.append((batch["image"], batch["text"]))
    optimizer = {"lr": 5e-4, "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6}
    print(f"bare loop, {args.model}, batch {args.batch}, {torch.cuda.get_device_name(device)}")
    medians: dict[int, list[float]] = {n: [] for n in SAMPLER_COUNTS}
    for round_index in range(args.rounds):
        for n in SAMPLER_COUNTS:
            samplers = [NvmlSampler(device) for _ in range(n)]
            for sampler in samplers:
                sampler.start()
            result = time_bare_loop(
                cfg, itertools.cycle(batches), device=device, warmup=args.warmup,
                steps=args.steps, optimizer=optimizer, autocast_ctx=autocast(device, "auto"),
            )  # fmt: skip
            for sampler in samplers:
                sampler.stop()
            taken = [sampler.result()["samples"] for sampler in samplers]
            medians[n].append(result["step"]["median_ms"])
            print(f"round {round_index + 1}, {n} sampler(s): median {medians[n][-1]:.2f} ms, "
                  f"NVML samples taken {taken}")  # fmt: skip
    for n, values in medians.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"{n} sampler(s): {statistics.median(values):.2f} ms (median of round medians: {rounds})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
