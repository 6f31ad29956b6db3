"""neuclip: NeuCLIP, "NeuCLIP: Efficient Large-Scale CLIP Training with Neural Normalizer
Optimization" (ICLR 2026), on FastCLIP's robust global contrastive loss with a learnable global
temperature (RGCL-g). METHODS.md section 4 is the specification.

Per side, tau * log(eps + g_i) is rewritten with log c = min_a {e^-a c + a - 1}; a comes from a
prototype normaliser network (NPN), so the objective is linear in the mini-batch estimate g:

    F = mean_i tau [ e^-a1_i (eps + g1_i) + a1_i - 1 + e^-a2_i (eps + g2_i) + a2_i - 1 ] + 2 rho tau
    g1_i = mean_{j != i} exp((s_ij - s_ii) / tau),  a1_i = log(eps + mean_k exp((cos(f_i, W1_k) - s_ii) / tau))

(g2, a2 likewise with the text anchor g_i, image negatives and W2). W1 summarises text embeddings
and scores image anchors; W2 summarises image embeddings and scores text anchors. The prototypes
are stored as rows (m x d, the transpose of METHODS.md's d x m).

One training step, in this order (everything but the clamp happens inside ``loss``):
 1. the encoders' L2-normalised features are gathered without gradient: the global batch, the
    same on every rank, so every rank computes identical NPN updates and identical prototypes;
 2. the global batch enters a FIFO queue of recent embeddings; if a restart is due, W1 <- queued
    text embeddings, W2 <- queued image embeddings (the AdaGrad accumulators are kept);
 3. ``npn_steps`` (T_u) AdaGrad steps on (W1, W2) minimising mean_i [e^-a_i (eps + g_i) + a_i] on
    both sides, with features, tau and g detached;
 4. a = the updated NPN's output, stop-gradient; F for the local rows against the gathered columns
    (with gradient) is the ``rgcl_loss`` that the trainer's one optimiser step minimises over the
    encoders and tau (DDP's gradient average then equals the global-batch gradient);
 5. ``after_step`` clamps tau >= ``tau_min``.

Everything is computed in float32 with autocast off, with log-sum-exp stabilisation: at tau = 0.01
exp((s_ij - s_ii) / tau) reaches e^200, far beyond float32. F is computed as exp(log(eps + g) - a),
exactly, so it overflows only where the objective itself leaves float32's range.

Logged each step (over the global batch, both sides): ``alpha_mean`` (mean a),
``log_norm_mean`` (mean in-batch log(eps + g)), ``normaliser_gap`` = mean |a - log(eps + g)|
(absolute: how well the NPN tracks the in-batch log-normaliser; the signed mean gap is
alpha_mean - log_norm_mean), and ``tau``.

[decision]s (METHODS.md's and this implementation's own; also in ``NeuClip.decisions``):
- Restarts draw from a FIFO queue of the most recent detached (global-batch) embeddings, capacity
  m; before the queue is full, m_eff = queue size (METHODS.md).
- The first restart is at step 0, from the first global batch (so the NPN starts with
  m_eff = N prototypes equal to that batch's embeddings); one extra restart when the queue first
  becomes full, so m_eff = m as soon as m embeddings exist; then every T_r steps.
- A restart draws m_eff queued embeddings without replacement with a generator seeded by the step
  counter (identical on every rank; with capacity m this is a permutation of the whole queue).
- A restart re-initialises the prototypes only; the AdaGrad accumulators run on for the whole
  run. Fresh queue embeddings already form a Monte-Carlo normaliser of recent data, and a zeroed
  accumulator would make AdaGrad's next step +-lr on every coordinate, throwing them away (on the
  micro model from a fresh restart: NPN objective 2.74 -> 6.07 after one step at lr 0.1).
- In the NPN step, the a-gradient 1 - e^(log(eps+g) - a) has its exponent capped at 80, so a
  badly lagging normaliser cannot overflow float32 (AdaGrad's step is scale-free anyway); F and
  its gradient are not capped.
- tau is the model's logit_scale (theta = log 1/tau), in its own AdamW group with lr_tau = lr/4 by
  default (the same warmup/cosine schedule), no weight decay, and tau >= 0.01.
- m = 4096 by default (GPU configs); configs/methods/neuclip.gin sets m = 256 for the tiny CPU
  models. AdaGrad lr 0.1, not tuned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import distributed
from methods import register
from methods.base import Method, clamp_logit_scale
from methods.clip import Clip
from methods.common import own_pairs

EXP_CAP = 80.0  # e^80 ~ 5.5e34 < float32 max (3.4e38): the NPN's overflow guard
RESTART_SEED = 0x5EED  # restart draws use torch.Generator seeded RESTART_SEED + step


# ---------------------------------------------------------------- the pure pieces


def log_eps_plus_mean_exp(z: torch.Tensor, *, count: int, eps: float) -> torch.Tensor:
    """log(eps + sum(exp(z), -1) / count) without overflow (-inf entries are left out)."""
    log_mean = torch.logsumexp(z, dim=-1) - math.log(count)
    return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps)))


def log_normalisers(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    *,
    tau: torch.Tensor,
    eps: float,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(eps + g1_i) and log(eps + g2_i) for the rows ``image``/``text`` over the columns.

    g1_i = mean_{j != i} exp((f_i.g_j - f_i.g_i) / tau) over the N columns ``all_text``, g2_i
    likewise with ``all_image``; row i's own pair is column ``offset + i`` and is left out.
    """
    n, total = image.shape[0], all_text.shape[0]
    if total < 2:
        raise ValueError(f"neuclip needs a global batch of at least 2 pairs, got {total}")
    positive = (image * text).sum(-1, keepdim=True)
    own = own_pairs(n, total, offset, image.device)

    def side(similarity: torch.Tensor) -> torch.Tensor:
        z = ((similarity - positive) / tau).masked_fill(own, float("-inf"))
        return log_eps_plus_mean_exp(z, count=total - 1, eps=eps)

    return side(image @ all_text.T), side(text @ all_image.T)


def npn_alpha(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    tau: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """a_i = log(eps + mean_k exp((cos(anchor_i, W_k) - positive_i) / tau)); W_k = prototype rows."""
    cos = anchor @ F.normalize(prototypes, dim=-1).T
    return log_eps_plus_mean_exp(
        (cos - positive[:, None]) / tau, count=prototypes.shape[0], eps=eps
    )


def npn_objective(alpha: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """mean_i [e^-a_i (eps + g_i) + a_i], minimised at a_i = log(eps + g_i), value mean(log_norm) + 1."""
    return (torch.exp(log_norm - alpha) + alpha).mean()


def npn_gradient(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    prototypes: torch.Tensor,
    log_norm: torch.Tensor,
    *,
    tau: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """d ``npn_objective`` / d prototypes in closed form: no autograd graph, a dozen kernels.

    The NPN step runs T_u = 10 times per side per training step on small matrices, so on a GPU
    its cost is kernel launches and autograd bookkeeping, not arithmetic (measured on an H100:
    the autograd version made neuclip's loss 24-42 ms). Leading dimensions broadcast: both sides
    go through at once as (2, N, d) anchors against (2, m, d) prototypes. With z_ik =
    (cos(f_i, W_k) - p_i) / tau and a_i = log(eps + mean_k e^z_ik), as in ``npn_alpha``:
        dJ/da_i    = (1 - e^(log_norm_i - a_i)) / N        (exponent capped at EXP_CAP)
        da_i/dz_ik = e^(z_ik - a_i) / m                    (<= 1/m: a_i >= z_ik - log m)
    and back through cos = f . W_k / |W_k|: dJ/dW_k = (G_k - Wn_k (G_k . Wn_k)) / |W_k|, where
    G_k = sum_i dJ/dcos_ik f_i and Wn_k = W_k / |W_k|.
    """
    m = prototypes.shape[-2]
    norm = prototypes.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
    unit_protos = prototypes / norm
    z = (anchor @ unit_protos.transpose(-1, -2) - positive[..., None]) / tau
    alpha = log_eps_plus_mean_exp(z, count=m, eps=eps)
    upstream = (1 - torch.exp((log_norm - alpha).clamp(max=EXP_CAP))) / anchor.shape[-2]
    d_cos = torch.exp(z - alpha[..., None] - math.log(m)) * (upstream / tau)[..., None]
    d_unit = d_cos.transpose(-1, -2) @ anchor
    return (d_unit - unit_protos * (d_unit * unit_protos).sum(-1, keepdim=True)) / norm


def adagrad_npn_steps(
    prototypes: torch.Tensor,
    sumsq: torch.Tensor,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    log_norm: torch.Tensor,
    *,
    tau: torch.Tensor,
    eps: float,
    lr: float,
    steps: int,
    adagrad_eps: float = 1e-10,
) -> None:
    """``steps`` AdaGrad steps on ``prototypes`` (in place; ``sumsq`` its accumulator) on
    ``npn_objective``; anchors, positives, tau and ``log_norm`` are constants. Leading dimensions
    broadcast as in ``npn_gradient``."""
    for _ in range(steps):
        grad = npn_gradient(anchor, positive, prototypes, log_norm, tau=tau, eps=eps)
        sumsq.add_(grad.square())
        prototypes.addcdiv_(grad, sumsq.sqrt().add_(adagrad_eps), value=-lr)


def rgcl_objective(
    log_norm1: torch.Tensor,
    log_norm2: torch.Tensor,
    alpha1: torch.Tensor,
    alpha2: torch.Tensor,
    *,
    tau: torch.Tensor,
    rho: float,
) -> torch.Tensor:
    """F = mean_i tau [e^-a1 (eps + g1) + a1 - 1 + (same, side 2)] + 2 rho tau, via
    e^-a (eps + g) = exp(log(eps + g) - a); the a's are constants here."""
    per_pair = (
        torch.exp(log_norm1 - alpha1) + alpha1 - 1 + torch.exp(log_norm2 - alpha2) + alpha2 - 1
    )
    return tau * per_pair.mean() + 2 * rho * tau


# ---------------------------------------------------------------- the method

COUNTERS = ("step", "queue_fill", "queue_ptr", "num_active")


def _read_counters(module: NeuClip, incompatible_keys: Any = None) -> None:
    """After load_state_dict: mirror the counter buffers as Python ints (one host sync per load,
    none per step)."""
    module.counts = {name: int(getattr(module, name)) for name in COUNTERS}


@register("neuclip")
class NeuClip(Method):
    learned_buffers = ("w1", "w2")  # the NPN's 2·m·d prototypes, trained by its own AdaGrad
    decisions = (
        "restarts draw from a FIFO queue of the most recent detached global-batch embeddings "
        "(capacity m); before it is full, m_eff = queue size",
        "first restart at step 0 from the first global batch (m_eff = N), one more when the queue "
        "first fills, then every T_r steps",
        "a restart re-initialises the prototypes only; AdaGrad accumulators are never reset",
        "restart draws seeded by the step counter (identical on every rank)",
        "NPN a-gradient exponent capped at 80 (float32 overflow guard); F is not capped",
        "tau = 1/exp(logit_scale), own AdamW group lr/4 with the shared schedule, no decay, tau >= 0.01",
        "m = 256 for the tiny CPU models (4096 default); AdaGrad lr 0.1 untuned",
    )

    def __init__(
        self,
        num_prototypes: int = 4096,  # m
        npn_steps: int = 10,  # T_u: AdaGrad steps on the prototypes per training step
        restart_every: int = 500,  # T_r
        npn_lr: float = 0.1,  # AdaGrad learning rate
        eps: float = 1e-6,
        rho: float = 8.0,
        lr_tau_ratio: float = 0.25,  # lr_tau = lr * lr_tau_ratio
        tau_min: float = 0.01,  # tau floor: exp(logit_scale) <= 1 / tau_min
        adagrad_eps: float = 1e-10,
    ):
        super().__init__()
        checks = {
            "num_prototypes": num_prototypes >= 1,
            "npn_steps": npn_steps >= 0,
            "restart_every": restart_every >= 1,
            "npn_lr": npn_lr > 0,
            "eps": eps > 0,
            "rho": rho >= 0,
            "lr_tau_ratio": lr_tau_ratio >= 0,
            "tau_min": 0 < tau_min < 1,
            "adagrad_eps": adagrad_eps > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"neuclip.{key}={locals()[key]!r} is out of range")
        self.num_prototypes, self.npn_steps, self.restart_every = (
            num_prototypes, npn_steps, restart_every,
        )  # fmt: skip
        self.npn_lr, self.eps, self.rho, self.adagrad_eps = npn_lr, eps, rho, adagrad_eps
        self.lr_tau_ratio, self.tau_min = lr_tau_ratio, tau_min
        for name in COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self._allocate(0)  # the embedding width is known in build_model
        _read_counters(self)
        self.register_load_state_dict_post_hook(_read_counters)

    def _allocate(self, dim: int) -> None:
        """W1 (text prototypes), W2 (image prototypes), their AdaGrad sums, the queue: m x dim."""
        for name in ("w1", "w2", "w1_sumsq", "w2_sumsq", "queue_image", "queue_text"):
            self.register_buffer(name, torch.zeros(self.num_prototypes, dim))

    def cost_warmup_steps(self, global_batch: int) -> int:
        """Fill the queue first, so FLOPs are counted with m prototypes, not with m_eff = N."""
        return math.ceil(self.num_prototypes / global_batch)

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        model = super().build_model(model_cfg)
        self._allocate(int(model_cfg["embed_dim"]))
        return model

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float) -> list[dict]:
        """The default decay/no-decay groups without the logit scale, plus its own "tau" group."""
        scale = model.logit_scale
        groups = []
        for group in super().param_groups(model, lr=lr, weight_decay=weight_decay):
            kept = [(n, p) for n, p in zip(group["names"], group["params"], strict=True)
                    if p is not scale]  # fmt: skip
            if kept:
                names, params = zip(*kept, strict=True)
                groups.append({**group, "names": list(names), "params": list(params)})
        tau_group = {"names": ["model.logit_scale"], "params": [scale], "group": "tau"}
        return [*groups, {**tau_group, "lr": lr * self.lr_tau_ratio, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        clamp_logit_scale(model, max_scale=1.0 / self.tau_min)

    # -- the step -----------------------------------------------------
    # clip's features: L2-normalised CLS / end-of-text embeddings and s = exp(logit_scale)
    forward = Clip.forward

    def loss(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, text = outputs["image"], outputs["text"]
        if image.shape[-1] != self.w1.shape[-1]:
            raise RuntimeError(
                f"neuclip's prototypes are {self.w1.shape[-1]}-d but the embeddings are "
                f"{image.shape[-1]}-d: build the model with this method's build_model"
            )
        with torch.autocast(image.device.type, enabled=False):
            return self._loss(image.float(), text.float(), outputs["logit_scale"].float())

    def _loss(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        tau = 1.0 / logit_scale
        all_image = distributed.all_gather(image.detach())
        all_text = distributed.all_gather(text.detach())
        with torch.no_grad():
            global_norm = log_normalisers(
                all_image, all_text, all_image, all_text, tau=tau.detach(), eps=self.eps, offset=0
            )
        if self.training:  # evaluation-mode calls leave the method's state alone
            self._npn_step(all_image, all_text, global_norm, tau.detach())
        global_alpha = self._alphas(all_image, all_text, tau.detach())
        start = distributed.rank() * image.shape[0]
        local_alpha = [a[start : start + image.shape[0]] for a in global_alpha]
        local_norm = log_normalisers(
            image, text, distributed.all_gather_with_grad(image),
            distributed.all_gather_with_grad(text), tau=tau, eps=self.eps, offset=start,
        )  # fmt: skip
        alpha, norm = torch.cat(global_alpha), torch.cat(global_norm)
        return {
            "rgcl_loss": rgcl_objective(*local_norm, *local_alpha, tau=tau, rho=self.rho),
            "alpha_mean": alpha.mean(),
            "log_norm_mean": norm.mean(),
            "normaliser_gap": (alpha - norm).abs().mean(),
            "tau": tau.detach(),
        }

    @torch.no_grad()
    def _alphas(self, all_image, all_text, tau) -> tuple[torch.Tensor, torch.Tensor]:
        """The NPN's a1, a2 for the global batch (before any restart: the batch as prototypes)."""
        k = self.counts["num_active"]
        w1, w2 = (self.w1[:k], self.w2[:k]) if k else (all_text, all_image)
        positive = (all_image * all_text).sum(-1)
        return (
            npn_alpha(all_image, positive, w1, tau=tau, eps=self.eps),
            npn_alpha(all_text, positive, w2, tau=tau, eps=self.eps),
        )

    @torch.compiler.disable  # step counters and the active count: traced, each step recompiles
    @torch.no_grad()
    def _npn_step(self, all_image, all_text, global_norm, tau) -> None:
        """Queue, restart if due, then T_u AdaGrad steps on both prototype sets."""
        was_full = self.counts["queue_fill"] == self.num_prototypes
        self._push(all_image, all_text)
        just_filled = not was_full and self.counts["queue_fill"] == self.num_prototypes
        if self.counts["step"] % self.restart_every == 0 or just_filled:
            self._restart()
        k = self.counts["num_active"]
        # Both sides in one batched update (half the kernel launches): W1 scores image anchors,
        # W2 text anchors; the positives f_i . g_i are shared.
        prototypes = torch.stack([self.w1[:k], self.w2[:k]])
        sumsq = torch.stack([self.w1_sumsq[:k], self.w2_sumsq[:k]])
        adagrad_npn_steps(
            prototypes, sumsq, torch.stack([all_image, all_text]), (all_image * all_text).sum(-1),
            torch.stack(global_norm), tau=tau, eps=self.eps, lr=self.npn_lr,
            steps=self.npn_steps, adagrad_eps=self.adagrad_eps,
        )  # fmt: skip
        self.w1[:k], self.w2[:k] = prototypes
        self.w1_sumsq[:k], self.w2_sumsq[:k] = sumsq
        self._set_counter("step", self.counts["step"] + 1)

    def _push(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """FIFO: the newest embeddings overwrite the oldest; only the last m of a batch fit."""
        m = self.num_prototypes
        image, text = image[-m:], text[-m:]
        ptr, n = self.counts["queue_ptr"], image.shape[0]
        rows = (ptr + torch.arange(n, device=image.device)) % m
        self.queue_image[rows] = image
        self.queue_text[rows] = text
        self._set_counter("queue_ptr", (ptr + n) % m)
        self._set_counter("queue_fill", min(m, self.counts["queue_fill"] + n))

    def _restart(self) -> None:
        """W1 <- queued text embeddings, W2 <- queued image embeddings (the same random rows),
        m_eff = queue size. The AdaGrad accumulators are kept (module docstring)."""
        k = self.counts["queue_fill"]  # <= m, the queue's capacity: the draw is a permutation
        gen = torch.Generator().manual_seed(RESTART_SEED + self.counts["step"])
        rows = torch.randperm(k, generator=gen).to(self.w1.device)
        self.w1[:k] = self.queue_text[rows]
        self.w2[:k] = self.queue_image[rows]
        self._set_counter("num_active", k)

    def _set_counter(self, name: str, value: int) -> None:
        self.counts[name] = value
        getattr(self, name).fill_(value)  # device write, no host sync
