"""siclip: SiCLIP-style distillation, reconstructed. Report label: "SiCLIP-style (reconstructed)".

Paper: H. Liu, "Simplifying CLIP: Unleashing the Power of Large-Scale Models on Consumer-level
Computers", arXiv 2411.14789 (2024). Its code is not public; this follows METHODS.md section 5.

    L = L_clip + 2000 L_FD + L_CRD + L_ICL + L_PM          (every weight a gin parameter)

A student CLIP trains with its own clip loss, three distillation terms from a frozen teacher CLIP
and a pair-matching head. F, G: L2-normalised image / text embeddings; S student, T teacher;
every contrastive term scores local rows against columns gathered across ranks.

- FD  = MSE(norm(P_f F^S), F^T) + MSE(norm(P_g G^S), G^T), MSE the mean over elements.
- CRD = 1/2 [KL(softmax(s^T F^T G^T') || softmax(s^S F^S G^S')) + the transposed logits],
        row-wise, temperature 1, teacher logits detached (KL = CE(teacher -> student) - H(teacher)).
- ICL = 1/2 [CE(s_x F^S G^T', diag) + CE(s_x G^S F^T', diag)], s_x = exp(theta_x).
- PM  = CE over 3N pairs of head([f; g; f*g; |f-g|]) -> (no match, match): the N true pairs,
        one sampled negative text per image and one sampled negative image per text.

The teacher is owned by the method but is not a submodule: the optimiser, DDP, ``state_dict``
and ``train()`` never see it (it stays in eval mode, ``requires_grad=False``, run under
``no_grad``); it moves with the method (``Method.frozen_modules`` / ``_apply``); its source and
a sha256 of its weights are in the method's extra state, in run.json ``method_info`` (with the
teacher's own eval metrics when it is a harness run) and its parameters in costs.json
(``params_teacher``). Its forward is inside the trained step, so in step time and FLOPs.
Sources: ``siclip.teacher`` (a run directory of this harness), ``siclip.teacher_model`` +
``siclip.teacher_pretrained`` (an open_clip name and pretrained tag; needs network on first use),
or neither: ``stages`` then trains one first with method clip as a shared stage, reused by every
run with the same resolved teacher config.

Student options (default off): weight inheritance from the teacher where names and shapes match;
adjacent-block weight sharing; SAS-P blocks (He & Hofmann 2023, "Simplifying Transformer Blocks").

[decision]s (also in ``SiClip.decisions``):
- The report label is "SiCLIP-style (reconstructed)".
- ICL: s_x = exp(theta_x), its own learnable scale, theta_x initialised to log(1/0.07), no weight
  decay, clamped like the logit scale at 100 (one public port applies no exp()).
- FD: P is the identity (no parameters) when student and teacher embedding widths match, else a
  learned bias-free linear map; ICL then uses the projected student embeddings too.
- PM head: Linear(4d, d) - GELU - Linear(d, 2) on the student's normalised embeddings.
- PM negatives: drawn from softmax of the student's own scaled logits s^S F^S G^S' (detached,
  diagonal masked) over the global batch, by Gumbel-max with noise from a generator on the
  training device seeded by (siclip.seed, step); every rank draws the global noise and keeps its
  rows, so 1 and N processes pick the same negatives (CPU and CUDA generators draw different
  streams). On the device because the N x N draw on the CPU took 11 ms per step at N = 512, and
  on a GPU its copy made siclip's forward 3.7x slower at batch 512 than at 32 (measured, H100).
- Harness-trained teacher: method clip, model ``teacher_model`` (tiny-vit-teacher: width 96,
  about 2.6x the tiny-vit student's forward FLOPs), batch ``teacher_batch_size`` (512, the largest
  of the sweep), ``teacher_samples_factor`` (2) times the student's samples;
  ``teacher_grad_checkpointing`` recomputes its activations in backward (memory only, same math),
  for a teacher too large for its batch on the device.
- Teacher inputs: images resized (bilinear, antialiased) and re-normalised when the teacher wants
  another size or mean/std; tokens zero-padded or cut (end-of-text kept) to its context length.
- Weight inheritance copies teacher tensors with equal names and shapes, after the SAS-P swap and
  before block sharing (so a shared pair keeps block 2k's inherited weights).
- Block sharing: block 2k+1 *is* block 2k (one module, one set of parameters); with an odd number
  of blocks the last one stays unshared.
- SAS-P block: out = A LN(x) + beta_FF MLP(LN(x)), no skip connections, value and output
  projections removed (identity), A = alpha_h I + beta_h (softmax(QK'/sqrt(d) + M) - C) per head,
  alpha = beta = 1, W_Q = 0, beta_FF = 0.1 at init (the authors' defaults). At init A = I exactly,
  so the attention path is the identity map of LN(x): the paper's identity-at-init is that of the
  attention sub-block; the block as a whole is LN(x) + 0.1 MLP(LN(x)), not the identity of x.
- SAS-P with the text tower's causal mask M: C = softmax(M), the uniform average over the keys a
  query may see (row i: 1/(i+1) on tokens <= i), not (1/T) 11'; A then stays causal and is I at
  init. Without a mask C = (1/T) 11'.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import checkpoint, distributed, models
from harness.errors import ConfigError
from methods import register
from methods.base import MAX_LOGIT_SCALE, Method, RunInfo, Stage
from methods.common import contrastive_ce, cross_logits, own_pairs
from methods.student_options import (  # noqa: F401 - SasPBlock is part of siclip's API
    TOWERS,
    SasPBlock,
    inherit_weights,
    share_adjacent_blocks,
    towers,
    use_sas_p_blocks,
)
from methods.teacher import (  # noqa: F401 - EOT_TOKEN, fit_context are part of siclip's API
    EOT_TOKEN,
    Teacher,
    check_teacher_run_dir,
    check_tokenizer,
    fit_context,
    write_teacher_run_dir,
)

LABEL = "SiCLIP-style (reconstructed)"


# ---------------------------------------------------------------- loss terms


# student options the registry tests run in addition to the default student
VARIANT_BINDINGS = {
    "default": [],
    "sas_p": ["siclip.sas_p_blocks = 'both'"],
    "shared_blocks": ["siclip.share_blocks = 'both'", "siclip.inherit_from_teacher = True"],
}


def fd_loss(image: torch.Tensor, text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor):
    """Feature distillation: MSE of the (projected, re-normalised) student to the teacher."""
    return F.mse_loss(image.float(), t_image.float()) + F.mse_loss(text.float(), t_text.float())


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher row) || softmax(student row)); teacher detached."""
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
    log_s = F.log_softmax(student_logits.float(), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


def crd_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Contrastive relational distillation over (logits_per_image, logits_per_text) pairs."""
    return 0.5 * (kl_rows(teacher[0], student[0]) + kl_rows(teacher[1], student[1]))


def sample_negatives(logits: torch.Tensor, noise: torch.Tensor, *, offset: int) -> torch.Tensor:
    """One column per row, drawn from softmax(row) with the row's own pair masked (Gumbel-max).

    ``logits`` are n local rows against N columns, row r's pair at column ``offset + r``;
    ``noise`` holds the same rows of a global N x N Gumbel(0, 1) draw.
    """
    scores = logits.detach().float() + noise.to(logits.device)
    own = own_pairs(*scores.shape, offset, scores.device)
    # masked after the noise is added: -inf + inf would be NaN
    return scores.masked_fill_(own, float("-inf")).argmax(dim=1)


def gumbel_noise(
    n: int, *, seed: int, step: int, draws: int = 2, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``draws`` x n x n Gumbel(0, 1) noise on ``device``, the same on every rank for (seed,
    step) and device type."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    return -torch.empty(draws, n, n, device=device).exponential_(generator=gen).log()


def pm_loss(
    head: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    negative_text: torch.Tensor,
    negative_image: torch.Tensor,
) -> torch.Tensor:
    """CE over the n true pairs (match) and the 2n sampled pairs (no match)."""
    n = image.shape[0]
    logits = head(torch.cat([image, image, negative_image]), torch.cat([text, negative_text, text]))
    labels = (torch.arange(3 * n, device=image.device) < n).long()  # made there: no copy
    return F.cross_entropy(logits.float(), labels)


class PairMatchingHead(nn.Module):
    """MLP([f; g; f*g; |f-g|]) -> 2 logits: (no match, match)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, 2))

    @staticmethod
    def pair_features(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.cat([image, text, image * text, (image - text).abs()], dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pair_features(image, text))


# ---------------------------------------------------------------- the method


@register("siclip")
class SiClip(Method):
    decisions = (
        f"report label: {LABEL}; paper code not public",
        "ICL scale s_x = exp(theta_x), own parameter, theta_x init log(1/0.07), clamped at 100",
        "FD map P: identity when embedding widths match, else learned bias-free linear; "
        "ICL uses the projected student embeddings",
        "PM head: Linear(4d,d)-GELU-Linear(d,2) on [f; g; f*g; |f-g|] of student embeddings",
        "PM negatives ~ softmax of the student's detached scaled logits, diagonal masked, "
        "Gumbel-max on the global batch, noise drawn on the training device seeded by "
        "(siclip.seed, step)",
        "harness teacher: clip on teacher_model, batch teacher_batch_size, "
        "teacher_samples_factor x the student's samples, shared stage reused by config hash",
        "teacher inputs resized / re-normalised / re-padded when its sizes differ",
        "weight inheritance after the SAS-P swap, before block sharing",
        "block sharing: block 2k+1 is block 2k; an odd last block stays unshared",
        "SAS-P: A LN(x) + beta_FF MLP(LN(x)), W_V = W_O = I, A = alpha I + beta (softmax - C), "
        "W_Q = 0, alpha = beta = 1, beta_FF = 0.1 at init: attention path identity on LN(x)",
        "SAS-P causal text tower: C = softmax(causal mask), uniform over visible tokens",
    )

    def __init__(
        self,
        *,
        teacher: str | None = None,
        teacher_model: str = "tiny-vit-teacher",
        teacher_pretrained: str | None = None,
        teacher_batch_size: int = 512,
        teacher_samples_factor: float = 2.0,
        teacher_grad_checkpointing: bool = False,
        clip_weight: float = 1.0,
        fd_weight: float = 2000.0,
        crd_weight: float = 1.0,
        icl_weight: float = 1.0,
        pm_weight: float = 1.0,
        inherit_from_teacher: bool = False,
        share_blocks: str = "none",
        sas_p_blocks: str = "none",
        seed: int = 0,
    ):
        super().__init__()
        for key, value in (("share_blocks", share_blocks), ("sas_p_blocks", sas_p_blocks)):
            if value not in TOWERS:
                raise ConfigError(f"siclip.{key}={value!r}; choose one of {TOWERS}")
        if teacher and teacher_pretrained:
            raise ConfigError("set siclip.teacher or siclip.teacher_pretrained, not both")
        if teacher:
            check_teacher_run_dir(Path(teacher).resolve())  # fail before any compute
        self.teacher_dir = teacher
        self.teacher_model = teacher_model
        self.teacher_pretrained = teacher_pretrained
        self.teacher_batch_size = teacher_batch_size
        self.teacher_samples_factor = teacher_samples_factor
        self.teacher_grad_checkpointing = teacher_grad_checkpointing
        self.weights = dict(
            contrastive=clip_weight, fd=fd_weight, crd=crd_weight, icl=icl_weight, pm=pm_weight
        )
        self.inherit = inherit_from_teacher
        self.share_blocks = share_blocks
        self.sas_p_blocks = sas_p_blocks
        self.seed = seed
        self.icl_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._frozen: dict[str, Teacher] = {}  # plain dict: not a submodule
        self._step = 0  # pair-matching noise counter, saved in the extra state
        self._student: dict[str, Any] = {}

    # -- the teacher --------------------------------------------------
    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher_dir or self.teacher_pretrained)

    def teacher(self) -> Teacher:
        """The frozen teacher, loaded on first use (planning stages never loads it)."""
        if "teacher" not in self._frozen:
            if not self.has_teacher:
                raise ConfigError(
                    "siclip has no teacher: run it with harness.run (which trains one first), "
                    "or set siclip.teacher to a run directory or siclip.teacher_pretrained"
                )
            self._frozen["teacher"] = (
                Teacher.from_run_dir(self.teacher_dir)
                if self.teacher_dir
                else Teacher.from_pretrained(self.teacher_model, self.teacher_pretrained)
            )
        return self._frozen["teacher"]

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher().model} if self.has_teacher else {}

    def stages(self, run: RunInfo) -> list[Stage]:
        if self.has_teacher:
            return [Stage("main")]
        check_tokenizer(models.model_config(self.teacher_model), self.teacher_model)
        teacher = Stage(
            "teacher",
            bindings=(
                "METHOD = 'clip'",
                f"MODEL = '{self.teacher_model}'",
                f"BATCH_SIZE = {self.teacher_batch_size}",
                f"TRAIN_SAMPLES = {round(self.teacher_samples_factor * run.train_samples)}",
                # only the teacher: the student's step time stays comparable with clip's
                *(
                    ["TrainConfig.grad_checkpointing = True"]
                    if self.teacher_grad_checkpointing
                    else []
                ),
            ),
            shared=True,
        )
        return [teacher, Stage("student", inputs={"siclip.teacher": "teacher"})]

    # -- building -----------------------------------------------------
    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        teacher = self.teacher()
        dim, teacher_dim = model_cfg["embed_dim"], teacher.cfg["embed_dim"]
        with torch.random.fork_rng(devices=[]):  # the student's init stays clip's at one seed
            torch.manual_seed(self.seed)
            self.fd_image, self.fd_text = (
                nn.Identity() if dim == teacher_dim else nn.Linear(dim, teacher_dim, bias=False)
                for _ in range(2)
            )
            self.pm_head = PairMatchingHead(dim)
        model = models.build_clip(model_cfg)
        for transformer in towers(model, self.sas_p_blocks):
            use_sas_p_blocks(transformer)
        inherited = inherit_weights(model, teacher.model) if self.inherit else 0
        for transformer in towers(model, self.share_blocks):
            share_adjacent_blocks(transformer)
        self._student = {
            "params": sum(p.numel() for p in model.parameters()),  # shared weights count once
            "tensors": len(model.state_dict()),
            "inherited_tensors": inherited,
        }
        return model

    # -- training -----------------------------------------------------
    @torch.compiler.disable  # the step counter: traced, each step would recompile
    def _next_noise(self, n_global: int, device: torch.device) -> torch.Tensor:
        noise = gumbel_noise(n_global, seed=self.seed, step=self._step, device=device)
        self._step += 1
        return noise

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        image = models.normalize(models.encode_image(model, batch["image"])[0])
        text = models.normalize(models.encode_text(model, batch["text"]))
        t_image, t_text, t_scale = self.teacher().embed(batch["image"], batch["text"])
        n_global = image.shape[0] * distributed.world_size()
        noise = self._next_noise(n_global, image.device)
        return {
            "image": image,
            "text": text,
            "image_proj": _project(self.fd_image, image),
            "text_proj": _project(self.fd_text, text),
            "teacher_image": t_image,
            "teacher_text": t_text,
            "logit_scale": model.logit_scale.exp(),
            "teacher_logit_scale": t_scale,
            "icl_logit_scale": self.icl_logit_scale.exp(),
            "pm_noise": noise,
        }

    def loss(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        o = outputs
        image, text = o["image"], o["text"]
        all_image = distributed.all_gather_with_grad(image)
        all_text = distributed.all_gather_with_grad(text)
        t_all_image = distributed.all_gather(o["teacher_image"])  # the teacher needs no grad
        t_all_text = distributed.all_gather(o["teacher_text"])
        student = cross_logits(image, text, all_image, all_text, o["logit_scale"])
        teacher = cross_logits(
            o["teacher_image"], o["teacher_text"], t_all_image, t_all_text, o["teacher_logit_scale"]
        )
        interactive = cross_logits(
            o["image_proj"], o["text_proj"], t_all_image, t_all_text, o["icl_logit_scale"]
        )
        raw = {
            "contrastive": contrastive_ce(*student),
            "fd": fd_loss(o["image_proj"], o["text_proj"], o["teacher_image"], o["teacher_text"]),
            "crd": crd_loss(student, teacher),
            "icl": contrastive_ce(*interactive),
            "pm": self._pair_matching(image, text, all_image, all_text, student, o["pm_noise"]),
        }
        terms = {f"{k}_loss": self.weights[k] * v for k, v in raw.items()}  # summed by trainer
        terms.update({f"{k}_unweighted": v.detach() for k, v in raw.items() if k != "contrastive"})
        terms["logit_scale"] = o["logit_scale"].detach()
        terms["icl_logit_scale"] = o["icl_logit_scale"].detach()
        return terms

    def _pair_matching(self, image, text, all_image, all_text, student_logits, noise):
        n = image.shape[0]
        offset = n * distributed.rank()
        local = noise[:, offset : offset + n]
        negative_text = sample_negatives(student_logits[0], local[0], offset=offset)
        negative_image = sample_negatives(student_logits[1], local[1], offset=offset)
        return pm_loss(
            self.pm_head, image, text,
            negative_text=all_text[negative_text], negative_image=all_image[negative_image],
        )  # fmt: skip

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        super().after_step(model)
        self.icl_logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    # -- records ------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "label": LABEL,
            "weights": dict(self.weights),
            "teacher": self.teacher().describe() if self.has_teacher else None,
            "student": {
                "inherit_from_teacher": self.inherit,
                "share_blocks": self.share_blocks,
                "sas_p_blocks": self.sas_p_blocks,
                **self._student,
            },
        }

    example_variants = tuple(VARIANT_BINDINGS)

    def get_extra_state(self) -> dict[str, Any]:
        teacher = self.teacher() if self.has_teacher else None
        return {
            "teacher": teacher.location if teacher else "",
            "teacher_sha256": teacher.sha256 if teacher else "",
            "pm_step": self._step,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.has_teacher and state.get("teacher_sha256"):
            ours = self.teacher()
            if state["teacher_sha256"] != ours.sha256:
                raise checkpoint.CheckpointError(
                    f"this siclip checkpoint was trained with teacher {state['teacher']} "
                    f"(sha256 {state['teacher_sha256'][:12]}), but the configured teacher "
                    f"{ours.location} has sha256 {ours.sha256[:12]}"
                )
        self._step = int(state.get("pm_step", 0))

    @classmethod
    def example_bindings(
        cls, workdir: Path, model_cfg: dict[str, Any], variant: str = "default"
    ) -> list[str]:
        """A random-init teacher like ``model_cfg`` with a wider embedding (exercises P), plus
        the student option the variant names."""
        cfg = copy.deepcopy(model_cfg)
        cfg["embed_dim"] += 16
        tag = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
        run_dir = write_teacher_run_dir(Path(workdir) / f"siclip-teacher-{tag}", cfg)
        return [f"siclip.teacher = '{run_dir.resolve()}'", *VARIANT_BINDINGS[variant]]


def _project(projection: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if isinstance(projection, nn.Identity) else models.normalize(projection(x))
