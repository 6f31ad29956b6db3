"""Loss pieces shared by several methods (not a method itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness import distributed, models


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of local rows against the globally gathered batch.

    ``image`` and ``text`` are the local, L2-normalised embeddings; ``logit_scale`` is s = exp(theta).
    Each rank scores its n rows against all N columns; its positives sit at offset rank * n.
    """
    all_image = distributed.all_gather_with_grad(image)
    all_text = distributed.all_gather_with_grad(text)
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * distributed.rank()
    return 0.5 * (
        F.cross_entropy(logits_per_image.float(), labels)
        + F.cross_entropy(logits_per_text.float(), labels)
    )


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
