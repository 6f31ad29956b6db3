"""superclass: "Classification Done Right for Vision-Language Pre-Training" (NeurIPS 2024).

Two stages, each its own run directory (``stages``):

1. ``cls`` -- a vision tower only (no text tower is built or run, no contrastive loss):
       L = L_cls = -(1/B) sum_i sum_c y_hat_ic log softmax(z_i)_c
   softmax cross-entropy over the 49,408-token CLIP vocabulary against IDF-weighted multi-hot
   caption targets, from a LayerNorm + Linear head on the mean of the patch tokens (CLS
   excluded, after the final norm). Targets, online float64 IDF and head:
   methods/token_classification.py (METHODS.md section 2).
2. ``lit`` -- locked-image tuning, so retrieval and zero-shot can be measured: the stage-1 image
   tower is loaded and frozen except its final norm; a new projection (width -> embed_dim) of
   the mean-pooled patch tokens and a fresh text tower are trained with clip's loss.

[decision]s (METHODS.md):
- The LiT stage's samples-seen budget is a config value: ``lit_samples_fraction`` (default 0.5)
  times the stage-1 budget; the report shows both stages' samples and compute.
- The LiT stage's batch is a config value too: ``lit_batch_size`` (None: the run's batch;
  configs/methods/superclass.gin fixes it at 64). A fixed readout makes the superclass row of a
  batch sweep measure the classification pretraining's batch sensitivity rather than LiT's: at
  the cell's batch, LiT's fresh text tower got 51 steps at batch 512 and reached 0.6 mean R@1
  from the b512 tower; LiT at 64 from the same tower reached 5.9 (one run each, 2-core CPU).
  The cell's batch, throughput and cost columns are stage 1's; the report lists both stages.
- Start, end and pad token ids stay in the targets (their IDF weight goes to ~0 on its own);
  stop words are kept.
Implementation choices: the vision tower pools by the mean of the patch tokens in both stages
(open_clip ``pool_type='avg'``); stage 1 drops the tower's CLS projection (nothing trains it);
the linear probe reads the mean-pooled patch tokens in both stages, so it compares before and
after LiT on the same features (the trunk is frozen; only the final norm changes).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import checkpoint, models
from harness.errors import ConfigError
from methods import register
from methods.base import Method, RunInfo, Stage
from methods.common import clip_outputs, clip_terms
from methods.token_classification import TokenClassifier

PHASES = ("cls", "lit")
# trained in the LiT stage: the image tower's final norm and the new projection
LIT_TRAINABLE = frozenset({"ln_post.weight", "ln_post.bias", "proj"})


def mean_pooled_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config with the vision tower pooling the mean of its patch tokens."""
    cfg = copy.deepcopy(model_cfg)
    cfg["vision_cfg"]["pool_type"] = "avg"
    return cfg


def mean_patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens after the final norm (CLS excluded)."""
    return models.encode_image(model, images)[1].mean(1)


def locked_image_embedding(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The LiT image embedding: the frozen trunk runs without autograd, the final norm and the
    projection of the mean-pooled patch tokens with it. Equals ``visual(images)[0]``."""
    with torch.no_grad():  # open_clip's public API: the last block's patch tokens, pre-norm
        out = visual.forward_intermediates(
            images, indices=1, intermediates_only=True, output_fmt="NLC"
        )
    return visual.ln_post(out["image_intermediates"][-1]).mean(1) @ visual.proj


@register("superclass")
class SuperClass(Method):
    decisions = (
        "LiT stage budget = lit_samples_fraction (default 0.5) x stage-1 samples seen",
        "LiT stage batch = lit_batch_size (None: the run's; 64 in configs/methods/superclass.gin), "
        "a fixed readout for every cell of a sweep",
        "start, end and pad token ids stay in the multi-hot targets; stop words kept",
        "image tower pools the mean of the patch tokens in both stages; probe on those features",
    )

    def __init__(
        self,
        phase: str = "cls",
        init_from: str | None = None,
        lit_samples_fraction: float = 0.5,
        lit_batch_size: int | None = None,
    ):
        super().__init__()
        if phase not in PHASES:
            raise ConfigError(f"superclass.phase={phase!r}; choose one of {PHASES}")
        if phase == "lit" and not init_from:
            raise ConfigError(
                "superclass.phase='lit' needs superclass.init_from = the stage-1 run directory"
            )
        if not lit_samples_fraction > 0:
            raise ConfigError(
                f"superclass.lit_samples_fraction={lit_samples_fraction!r} must be > 0"
            )
        if lit_batch_size is not None and not (
            isinstance(lit_batch_size, int) and lit_batch_size >= 1
        ):
            raise ConfigError(
                f"superclass.lit_batch_size={lit_batch_size!r} must be a positive int or None"
            )
        self.phase = phase
        self.init_from = init_from
        self.lit_samples_fraction = lit_samples_fraction
        self.lit_batch_size = lit_batch_size
        self.classifier: TokenClassifier | None = None

    example_variants = PHASES

    @classmethod
    def example_bindings(
        cls, workdir: Path, model_cfg: dict[str, Any], variant: str = "cls"
    ) -> list[str]:
        """Stage 1 needs nothing; the LiT phase needs a stage-1 tower, written under workdir."""
        if variant in ("cls", "default"):
            return []
        tag = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]
        run_dir = write_stage1_run_dir(Path(workdir) / f"superclass-stage1-{tag}", model_cfg)
        return ["superclass.phase = 'lit'", f"superclass.init_from = '{run_dir.resolve()}'"]

    def stages(self, run: RunInfo) -> list[Stage]:
        lit_samples = max(1, round(self.lit_samples_fraction * run.train_samples))
        lit = ["superclass.phase = 'lit'", f"TRAIN_SAMPLES = {lit_samples}"]
        if self.lit_batch_size is not None:
            lit.append(f"TrainConfig.batch_size = {self.lit_batch_size}")
        return [
            Stage("cls", bindings=("superclass.phase = 'cls'",)),
            Stage("lit", bindings=tuple(lit), inputs={"superclass.init_from": "cls"}),
        ]

    # -- building -----------------------------------------------------
    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        cfg = mean_pooled_config(model_cfg)
        if self.phase == "cls":
            model = models.build_vision_tower(cfg)
            model.visual.proj = None  # the CLS projection has no loss to train it here
            self.classifier = TokenClassifier(cfg["vision_cfg"]["width"])
            return model
        model = models.build_clip(cfg)  # fresh text tower and a fresh image projection
        load_image_tower(model.visual, Path(self.init_from))
        for name, param in model.visual.named_parameters():
            param.requires_grad = name in LIT_TRAINABLE
        return model

    # -- training -----------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.phase == "cls":
            pooled, _ = models.encode_image(model, batch["image"])  # mean patch tokens
            return self.classifier(pooled, batch["text"])
        image = locked_image_embedding(model.visual, batch["image"])
        return clip_outputs(model, image, batch["text"])

    def loss(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.phase == "cls":
            return {"cls_loss": self.classifier.loss(outputs)}
        return clip_terms(outputs)

    # -- evaluation ---------------------------------------------------
    def probe_features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return mean_patch_tokens(model, images)


def write_stage1_run_dir(run_dir: Path, model_cfg: dict[str, Any], *, seed: int = 0) -> Path:
    """A stage-1 checkpoint of a randomly initialised tower (for tests and benchmarks)."""
    if not checkpoint.latest(run_dir).exists():
        torch.manual_seed(seed)
        tower = SuperClass(phase="cls").build_model(model_cfg)
        checkpoint.save(checkpoint.latest(run_dir), {"model": tower.state_dict()})
    return run_dir


def load_image_tower(visual: nn.Module, run_dir: Path) -> None:
    """Load a stage-1 run's image tower into ``visual``; its projection stays as initialised."""
    path = checkpoint.latest(run_dir)
    state = checkpoint.load(path)["model"]
    tower = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    expected = {k: v for k, v in visual.state_dict().items() if k != "proj"}
    problem = checkpoint.describe_mismatch(expected, tower)
    if problem:
        raise checkpoint.CheckpointError(
            f"{path} is not a superclass stage-1 image tower: {problem}"
        )
    visual.load_state_dict(tower, strict=False)
