"""Peak memory of one training step and of the harness's FLOP count of it.

``python -m bench.memory [--model ViT-L-14] [--method clip] [--batch 512] [--grad-checkpointing]``

Before a run trains, the harness counts its step's FLOPs (``harness.costs.count_costs``) on a
copy of the model at the full per-rank batch, so that count must fit wherever the step fits.
This prints both peaks: CUDA max_memory_allocated on a GPU, the process's peak RSS on the CPU
(each after a reset, with what the process held before; on the CPU freed memory stays with the
process, so the second figure there starts from the first one's high-water mark). The default
model, method and batch are the GPU config's siclip teacher: ViT-L/14 at batch 512 under bf16
needs recomputation.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import methods
from bench.measure import sync
from harness import models
from harness.costs import count_costs, synthetic_batch
from harness.data.loader import prepare_batch
from harness.errors import report_errors
from harness.hardware import PeakMemory
from harness.step import TrainStep, autocast, enable_grad_checkpointing


def peak_of(run: Callable[[], None], device: torch.device) -> tuple[float, float, str]:
    """(peak MB while ``run`` ran, MB held just before, what the peak measures)."""
    peak = PeakMemory(device)
    before = peak.held_mb()
    peak.reset()
    run()
    sync(device)
    return peak.peak_mb(), before, peak.kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--model", default="ViT-L-14", help="configs/models/<name> or open_clip's")
    parser.add_argument("--method", default="clip")
    parser.add_argument("--batch", type=int, default=512, help="per-rank batch")
    parser.add_argument("--grad-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: need at least 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with report_errors():  # an unknown model or method, or blocks it cannot recompute
        cfg = models.model_config(args.model)
        method = methods.build_method(args.method)
        torch.manual_seed(0)
        model = method.build_model(cfg)
        if args.grad_checkpointing:
            enable_grad_checkpointing(model)
    step = TrainStep(model, method).to(device)
    size, context = models.image_size(cfg), models.context_length(cfg)

    def train_step() -> None:
        batch = prepare_batch(synthetic_batch(args.batch, size, context), device)
        with autocast(device, "auto"):
            loss = step(batch)["loss"]
        loss.backward()

    def flop_count() -> None:
        count_costs(
            step, per_rank_batch=args.batch, image_size=size, context_length=context,
            device=device, autocast_ctx=autocast(device, "auto"),
        )  # fmt: skip

    print(
        f"{args.method} on {args.model}, batch {args.batch}, {device.type}, "
        f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}"
    )
    for label, run in (("forward + backward", train_step), ("FLOP count", flop_count)):
        try:
            peak, before, kind = peak_of(run, device)
        except torch.OutOfMemoryError:
            print(f"  {label:<18} out of memory")
        else:
            print(f"  {label:<18} peak {peak:>9.0f} MB ({kind}; {before:.0f} MB held before)")
        step.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
