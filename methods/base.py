"""The method interface: what a pretraining objective supplies to the one shared trainer.

A method is an ``nn.Module`` so that whatever trainable state it adds (heads, prototypes,
projections) and whatever buffers it keeps (IDF statistics, queues) are seen by the optimiser,
DDP and checkpoints without the trainer knowing about them.

The trainer calls, per step::

    outputs = method(model, batch)          # forward: features, logits, tokens...
    terms = method.loss(outputs)            # named tensors; keys ending in "_loss" are summed
    ... backward, optimiser step ...
    method.after_step(model)                # clamps, restarts, queue updates

and, once: ``build_model``, ``param_groups``, ``stages``. The evaluator calls ``embed_images``,
``embed_texts`` and ``probe_features``. Collectives go through ``harness.distributed``.

A method may also run modules it neither trains nor checkpoints (a frozen teacher): it returns
them from ``frozen_modules``. They are not submodules, so the optimiser, DDP, ``state_dict`` and
``train()`` never reach them, but they move with the method (``.to``) and ``harness.costs``
counts their parameters (their FLOPs are counted because the method's forward runs them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from harness import models

MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class Stage:
    """One training run of a method's pipeline, with its own run directory.

    ``bindings`` are gin bindings applied on top of the run's config for this stage only.
    ``inputs`` maps a gin parameter (e.g. ``"superclass.init_from"``) to the name of an earlier
    stage; the harness binds it to that stage's finished run directory. A ``shared`` stage is
    cached by its resolved config hash and reused by every run that needs the same one.
    """

    name: str
    bindings: tuple[str, ...] = ()
    inputs: Mapping[str, str] = field(default_factory=dict)
    shared: bool = False


@dataclass(frozen=True)
class RunInfo:
    """What a method may know about the run when it plans its stages."""

    batch_size: int
    train_samples: int
    model: str


class Method(nn.Module):
    """Base class. Subclasses set ``name`` via ``@register`` and implement forward and loss."""

    name: ClassVar[str] = "base"
    # The open choices this implementation made (METHODS.md "[decision]"), for report headers.
    decisions: ClassVar[tuple[str, ...]] = ()

    # -- building -----------------------------------------------------
    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        """The model the method trains (default: open_clip CLIP with patch tokens)."""
        return models.build_clip(model_cfg)

    def stages(self, run: RunInfo) -> list[Stage]:
        """The runs this method needs, in order; the last one is the method's result."""
        return [Stage("main")]

    # Buffers the method optimises itself, outside AdamW (NeuCLIP's prototypes): costs.json
    # counts them as trainable parameters of the method.
    learned_buffers: ClassVar[tuple[str, ...]] = ()

    def cost_warmup_steps(self, global_batch: int) -> int:
        """Steps to run before FLOPs are counted, so the count is of a steady-state step
        (e.g. until a queue is full); default 0."""
        return 0

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules the method runs but never trains or saves (e.g. a teacher), by name."""
        return {}

    def _apply(self, fn: Callable, recurse: bool = True) -> Method:
        # .to() / .cuda() / .float() reach submodules through _apply; frozen modules follow too
        super()._apply(fn, recurse)
        for module in self.frozen_modules().values():
            module._apply(fn)
        return self

    def info(self) -> dict[str, Any]:
        """JSON facts about this configured method, recorded in run.json as ``method_info``."""
        return {}

    # Named configurations the registry-parametrised tests run, each held to the same checks
    # (a multi-stage method's later stages, a method's optional student variants...).
    example_variants: ClassVar[tuple[str, ...]] = ("default",)

    @classmethod
    def example_bindings(
        cls, workdir: Path, model_cfg: dict[str, Any], variant: str = "default"
    ) -> list[str]:
        """Gin bindings that let the method run one step on its own, outside any pipeline.

        For tests and benchmarks that build a method by name (default: none needed). A method
        that needs an input an earlier stage would produce (a teacher checkpoint, say) writes a
        small deterministic one under ``workdir`` for a model configured by ``model_cfg``.
        ``variant`` is one of ``example_variants``.
        """
        return []

    # -- training -----------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float) -> list[dict]:
        """Optimiser groups over the model's and the method's own trainable parameters."""
        return default_param_groups(
            [("model.", model), ("method.", self)], lr=lr, weight_decay=weight_decay
        )

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step. Default: keep exp(logit_scale) <= 100."""
        clamp_logit_scale(model)

    # -- evaluation ---------------------------------------------------
    def embed_images(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings used for retrieval and zero-shot."""
        return models.normalize(models.encode_image(model, images)[0])

    def embed_texts(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings used for retrieval and zero-shot."""
        return models.normalize(models.encode_text(model, tokens))

    def has_text_tower(self, model: nn.Module) -> bool:
        """False for image-only models: the evaluator then skips retrieval and zero-shot."""
        return hasattr(model, "encode_text")

    def probe_features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        """Frozen image features for the linear probe; None means the retrieval embedding
        (which the evaluator has computed already, so nothing runs twice)."""
        return None


# ---------------------------------------------------------------- shared helpers


def clamp_logit_scale(model: nn.Module, max_scale: float = MAX_LOGIT_SCALE) -> None:
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.data.clamp_(max=math.log(max_scale))


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """No weight decay on gains, biases, norms and logit scales: norms and gains are 1-D."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf == "bias" or "logit_scale" in name


def default_param_groups(
    modules: list[tuple[str, nn.Module]], *, lr: float, weight_decay: float
) -> list[dict]:
    """Two AdamW groups, decay and no-decay; each group records its parameter names."""
    decay, no_decay = {"names": [], "params": []}, {"names": [], "params": []}
    seen: set[int] = set()
    for prefix, module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group = no_decay if is_no_decay(name, param) else decay
            group["names"].append(prefix + name)
            group["params"].append(param)
    groups = [
        {**decay, "lr": lr, "weight_decay": weight_decay, "group": "decay"},
        {**no_decay, "lr": lr, "weight_decay": 0.0, "group": "no_decay"},
    ]
    return [g for g in groups if g["params"]]
