"""One training step's pieces: the model and method as one module, the summed loss, precision,
activation recomputation and repeatable kernels."""

from __future__ import annotations

import contextlib
import os

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from harness.errors import ConfigError
from methods.base import Method


class TrainStep(nn.Module):
    """model + method as one module, so DDP and checkpoints see the method's own state.

    Returns ``{"loss": the summed *_loss terms, **every term detached}``: the sum is the one
    output that carries gradient (summing inside also keeps torch.compile, when on, clear of a
    failure with outputs that alias a detached term).
    """

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = self.method.loss(self.method(self.model, batch))
        return {"loss": total_loss(terms), **{k: v.detach() for k, v in terms.items()}}


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [v for k, v in terms.items() if k.endswith("_loss")]
    if not losses:
        raise ValueError(f"method returned no '*_loss' term, only {sorted(terms)}")
    return torch.stack([v.float() for v in losses]).sum()


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Diverged(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"loss became NaN or inf at step {step}")
        self.step = step


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in every open_clip transformer of ``model``.

    open_clip's transformers check their own ``grad_checkpointing`` flag per block, so this
    reaches every tower a method builds (a CLIP, a lone vision tower, a student's blocks). open_clip
    calls a block as ``block(x, None, None, attn_mask)`` when recomputing, which only its default
    ``ResidualAttentionBlock`` accepts: other blocks (``block_type: custom``, SAS-P) are refused.
    """
    towers = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    blocks = [b for tower in towers for b in getattr(tower, "resblocks", ())]
    other = sorted({type(b).__name__ for b in blocks} - {ResidualAttentionBlock.__name__})
    if not blocks or other:
        found = f"blocks of type {', '.join(other)}" if other else "no open_clip transformer"
        raise ConfigError(
            f"TrainConfig.grad_checkpointing=True, but the model ({type(model).__name__}) has "
            f"{found}: open_clip recomputes only its default ResidualAttentionBlock (a model "
            "config without block_type 'custom')"
        )
    for tower in towers:
        tower.grad_checkpointing = True


def set_deterministic() -> None:
    """Repeatable kernels: resumed and uninterrupted runs then agree (tests/test_run.py)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
