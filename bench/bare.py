"""The bare loop: the same open_clip CLIP trained with no harness at all.

open_clip's ``CLIP`` forward, open_clip's ``ClipLoss``, backward, fused AdamW (the harness's
optimiser settings), the logit-scale clamp; batches already in memory (real batches of the same
loader, normalised beforehand), so no data loading, logging or bookkeeping is in the timed
steps. This is the floor the harness's clip step is measured against.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import open_clip
import torch

from bench.measure import PeakMemory, now, summarise_ms


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
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    warmup: int,
    steps: int,
    optimizer: dict[str, Any],
    autocast_ctx,
    seed: int = 0,
) -> dict[str, Any]:
    """Median / p10 / p90 step time of the bare loop over ``batches`` (cycled)."""
    torch.manual_seed(seed)
    model = bare_model(model_cfg, device).train()
    opt = bare_optimizer(model, **optimizer)
    loss_fn = open_clip.ClipLoss()
    peak = PeakMemory(device)
    durations = []
    for i in range(warmup + steps):
        images, text = batches[i % len(batches)]
        if i == warmup:
            peak.reset()
        start = now(device)
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
