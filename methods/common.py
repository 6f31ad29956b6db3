"""Loss pieces shared by several methods (not a method itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness import distributed, models


def cross_logits(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s image all_text^T, s text all_image^T): local rows against the gathered columns."""
    return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T


def own_pairs(n: int, total: int, offset: int, device: torch.device) -> torch.Tensor:
    """n x total bool mask of each local row's own pair, column ``offset + row``.

    Built by comparison, not by assigning True at indices: that assignment copies the value
    to the GPU and makes the host wait for it every step.
    """
    rows = torch.arange(n, device=device)
    return torch.arange(total, device=device) == (offset + rows)[:, None]


def contrastive_ce(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """1/2 [CE(logits_per_image, diag) + CE(logits_per_text, diag)] on local rows.

    Each rank holds n rows against all N columns; its positives sit at offset rank * n.
    """
    n = logits_per_image.shape[0]
    labels = torch.arange(n, device=logits_per_image.device) + n * distributed.rank()
    return 0.5 * (
        F.cross_entropy(logits_per_image.float(), labels)
        + F.cross_entropy(logits_per_text.float(), labels)
    )


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of local rows against the globally gathered batch.

    ``image`` and ``text`` are the local, L2-normalised embeddings; ``logit_scale`` is s = exp(theta).
    """
    all_image = distributed.all_gather_with_grad(image)
    all_text = distributed.all_gather_with_grad(text)
    return contrastive_ce(*cross_logits(image, text, all_image, all_text, logit_scale))


def clip_outputs(
    model: nn.Module, image: torch.Tensor, text_tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The inputs of ``clip_terms``: the given image embedding and the model's text embedding,
    both L2-normalised, and the logit scale s = exp(theta)."""
    return {
        "image": models.normalize(image),
        "text": models.normalize(models.encode_text(model, text_tokens)),
        "logit_scale": model.logit_scale.exp(),
    }


def clip_terms(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clip's loss terms: the contrastive loss, and the logit scale for the log."""
    loss = clip_loss(outputs["image"], outputs["text"], outputs["logit_scale"])
    return {"contrastive_loss": loss, "logit_scale": outputs["logit_scale"].detach()}
