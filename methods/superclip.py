"""superclip: "SuperCLIP: CLIP with Simple Classification Supervision" (NeurIPS 2025).

    L = L_clip + lambda * L_cls,   lambda = cls_weight = 1.0 (constant)

L_clip is clip's loss on the CLS embedding (methods/clip.py). L_cls is SuperClass's loss
(methods/token_classification.py, METHODS.md section 2): softmax cross-entropy over the
49,408-token CLIP vocabulary against IDF-weighted multi-hot caption targets, from a
LayerNorm + Linear head on the mean of the patch tokens (CLS excluded, after the final norm).
Targets, online IDF and L_cls are computed per rank on the local batch; only the float64 IDF
buffers are all-reduced. The head is discarded at inference: retrieval and zero-shot use the
clip embeddings.

[decision]s: none of its own in METHODS.md. Shared with superclass: start, end and pad ids stay
in the targets (their IDF weight goes to ~0 on its own); stop words are kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness import models
from methods import register
from methods.base import Method
from methods.common import clip_outputs, clip_terms
from methods.token_classification import TokenClassifier


@register("superclip")
class SuperClip(Method):
    decisions = (
        "classification loss weight lambda = cls_weight (default 1.0), constant",
        "start, end and pad token ids stay in the multi-hot targets; stop words kept",
    )

    def __init__(self, cls_weight: float = 1.0):
        super().__init__()
        if cls_weight < 0:
            raise ValueError(f"superclip.cls_weight={cls_weight!r} must be >= 0")
        self.cls_weight = cls_weight
        self.classifier: TokenClassifier | None = None

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        model = models.build_clip(model_cfg)
        self.classifier = TokenClassifier(model_cfg["vision_cfg"]["width"])
        return model

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        image, tokens = models.encode_image(model, batch["image"])
        return {
            **clip_outputs(model, image, batch["text"]),
            **self.classifier(tokens.mean(1), batch["text"]),
        }

    def loss(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        cls = self.classifier.loss(outputs)
        return {
            **clip_terms(outputs),
            "cls_loss": self.cls_weight * cls,
            "cls_ce": cls.detach(),  # unweighted, for the log
        }
