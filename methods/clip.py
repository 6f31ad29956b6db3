"""clip: vanilla CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; open_clip's ClipLoss).

    L = 1/2 [ CE(s F G^T, diag) + CE(s G F^T, diag) ],  s = exp(theta) <= 100

F: image embeddings (CLS token after the final norm, projected), G: text embeddings (end-of-text
token, projected), both L2-normalised; features gathered across ranks with gradient, local rows
against all columns. No open choices ([decision]s) beyond the shared ones in METHODS.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness import models
from methods import register
from methods.base import Method
from methods.common import clip_loss


@register("clip")
class Clip(Method):
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        image, _ = models.encode_image(model, batch["image"])
        text = models.encode_text(model, batch["text"])
        return {
            "image": models.normalize(image),
            "text": models.normalize(text),
            "logit_scale": model.logit_scale.exp(),
        }

    def loss(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss = clip_loss(outputs["image"], outputs["text"], outputs["logit_scale"])
        return {"contrastive_loss": loss, "logit_scale": outputs["logit_scale"].detach()}
