"""Loss pieces shared by several methods (not a method itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness import distributed


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
