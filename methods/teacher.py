"""siclip's frozen teacher: a CLIP from a harness run directory or an open_clip pretrained tag.

The teacher is not a submodule of the method (see methods/siclip.py): it is frozen, always in eval
mode, run without gradient, and identified by a sha256 of its weights.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from harness import checkpoint, models, rundir
from harness.errors import ConfigError
from harness.files import write_json_atomic

CLIP_VOCAB = 49408
EOT_TOKEN = 49407


class Teacher:
    """A frozen CLIP built from a harness run directory or an open_clip pretrained tag."""

    def __init__(self, model: nn.Module, cfg: dict[str, Any], *, source: str, location: str):
        model.eval().requires_grad_(False)
        self.model, self.cfg, self.source, self.location = model, cfg, source, location
        self.sha256 = weights_sha256(model)
        check_tokenizer(cfg, location)
        mean_std = getattr(model.visual, "preprocess_cfg", {})
        self.mean = tuple(mean_std.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(mean_std.get("std", open_clip.OPENAI_DATASET_STD))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> Teacher:
        run_dir = Path(run_dir).resolve()
        record = check_teacher_run_dir(run_dir)
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten anyway
            model = models.build_clip(record["model_config"])
        state = checkpoint.load(checkpoint.latest(run_dir))
        checkpoint.load_state_strict(model, state["model"], f"siclip teacher {run_dir}")
        return cls(model, record["model_config"], source="run_dir", location=str(run_dir))

    @classmethod
    def from_pretrained(cls, name: str, tag: str) -> Teacher:
        with torch.random.fork_rng(devices=[]):
            model = open_clip.create_model(name, pretrained=tag)  # downloads on first use
        cfg = models.model_config(name)
        return cls(model, cfg, source="open_clip", location=f"{name}:{tag}")

    @torch.no_grad()
    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised teacher embeddings of a batch prepared for the student."""
        images = self._images(images)
        tokens = fit_context(tokens, models.context_length(self.cfg))
        pooled = self.model.visual(images)
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        text = self.model.encode_text(tokens)
        return models.normalize(pooled), models.normalize(text), self.model.logit_scale.exp()

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        size = models.image_size(self.cfg)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if (self.mean, self.std) != (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD):
            like = (images.dtype, images.device)
            ours = _stats(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, *like)
            theirs = _stats(self.mean, self.std, *like)
            images = (images * ours[1] + ours[0] - theirs[0]) / theirs[1]
        return images

    def describe(self) -> dict[str, Any]:
        info = {
            "source": self.source,
            "location": self.location,
            "sha256": self.sha256,
            "embed_dim": self.cfg["embed_dim"],
            "params": sum(p.numel() for p in self.model.parameters()),
        }
        if self.source == "run_dir":
            info["eval"] = rundir.read_json(Path(self.location) / "eval.json")
        return info


@functools.lru_cache(maxsize=16)
def _stats(
    mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as tensors on ``device``, made once: a copy to the GPU every
    step would make the host wait for it."""
    view = (1, 3, 1, 1)
    return (
        torch.tensor(mean, dtype=dtype, device=device).view(view),
        torch.tensor(std, dtype=dtype, device=device).view(view),
    )


def check_teacher_run_dir(run_dir: Path) -> dict[str, Any]:
    record = rundir.read_json(run_dir / "run.json")
    if record is None or "model_config" not in record:
        raise ConfigError(
            f"siclip.teacher={str(run_dir)!r} is not a run directory of this harness "
            "(no run.json with a model_config)"
        )
    if not checkpoint.latest(run_dir).exists():
        raise ConfigError(f"siclip.teacher={str(run_dir)!r} has no {checkpoint.latest(run_dir)}")
    return record


def check_tokenizer(cfg: dict[str, Any], where: str) -> None:
    text = cfg["text_cfg"]
    if text.get("hf_tokenizer_name") or text.get("vocab_size", CLIP_VOCAB) != CLIP_VOCAB:
        raise ConfigError(
            f"siclip teacher {where}: its text tower does not use the CLIP BPE tokenizer "
            f"(vocab {text.get('vocab_size')}, {text.get('hf_tokenizer_name')}); the student's "
            "tokens cannot be fed to it"
        )


def fit_context(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad or cut token rows to ``length``; a cut row keeps its end-of-text token last."""
    if tokens.shape[1] == length:
        return tokens
    if tokens.shape[1] < length:
        return F.pad(tokens, (0, length - tokens.shape[1]))
    cut = tokens[:, :length].clone()
    lost = (cut == EOT_TOKEN).sum(dim=1) == 0
    cut[lost, -1] = EOT_TOKEN
    return cut


def weights_sha256(model: nn.Module) -> str:
    """Content hash of a model's weights (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_teacher_run_dir(run_dir: Path, model_cfg: dict[str, Any], *, seed: int = 0) -> Path:
    """A minimal run directory holding a randomly initialised CLIP (tests, benchmarks)."""
    if checkpoint.latest(run_dir).exists():
        return run_dir
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.build_clip(model_cfg)
    write_json_atomic(
        run_dir / "run.json",
        {"method": "clip", "model_config": model_cfg, "note": "random-init example teacher"},
    )
    checkpoint.save(checkpoint.latest(run_dir), {"model": model.state_dict()})
    return run_dir
