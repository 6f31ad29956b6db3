"""The bare loop: the same open_clip CLIP trained with no harness at all.

open_clip's ``CLIP`` forward, open_clip's ``ClipLoss``, backward, fused AdamW (the harness's
optimiser settings), the logit-scale clamp; no logging or bookkeeping. Fed either batches
already in memory (real batches of the same loader, normalised beforehand: the floor of the
model's compute) or the harness's own loader, live (the floor of any trainer that must also load
its data on the same cores). The harness's clip step is measured against both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import open_clip
import torch

from bench.measure import now, summarise_ms
from harness.hardware import PeakMemory


def bare_model(model_cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text", None)
    return open_clip.CLIP(**cfg).to(device)


def bare_optimizer(model: torch.nn.Module, *, lr, weight_decay, betas, eps) -> torch.optim.AdamW:
    """Fused AdamW over two groups, weight decay on matrices only (as every CLIP trainer does)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim < 2 or "logit_scale" in n]
    decay = [p for n, p in named if not (p.ndim < 2 or "logit_scale" in n)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def time_bare_loop(
    model_cfg: dict[str, Any],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    warmup: int,
    steps: int,
    optimizer: dict[str, Any],
    autocast_ctx,
    seed: int = 0,
) -> dict[str, Any]:
    """Median / p10 / p90 step time of the bare loop; fetching the next batch is timed."""
    torch.manual_seed(seed)
    model = bare_model(model_cfg, device).train()
    opt = bare_optimizer(model, **optimizer)
    loss_fn = open_clip.ClipLoss()
    peak = PeakMemory(device)
    durations = []
    for i in range(warmup + steps):
        if i == warmup:
            peak.reset()
        start = now(device)
        images, text = next(batches)
        with autocast_ctx:
            image_features, text_features, logit_scale = model(images, text)
            loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))
        end = now(device)
        if i >= warmup:
            durations.append(end - start)
    return {
        "step": summarise_ms(durations),
        "peak_memory_mb": peak.peak_mb(),
        "memory_kind": peak.kind,
    }
