"""Token-classification supervision shared by superclass and superclip (not a method itself).

METHODS.md section 2. A caption's padded CLIP-BPE id sequence becomes a de-duplicated multi-hot
y in {0,1}^V (V = 49,408; start, end and pad ids stay in). Online IDF, in float64 buffers:
each step adds the global batch's column mean of y to ``df`` and 1 to ``steps`` (averaged across
ranks), then w_c = log((n + 1/N) / (df_c + 1/N)), i.e. log((samples_seen + 1) / (DF_c + 1)).
Soft target y_hat = (y * w) / max(||y * w||_1, 1e-12); loss = softmax cross-entropy over all V
classes, L = -(1/B) sum_i sum_c y_hat_ic log softmax(z_i)_c, per rank on the local batch.

Nothing here is dense in V except the logits z (B x V), which no formulation avoids: y is kept
as (row, id, value) entries, one per caption position, the IDF update is an ``index_add_``, and
the loss is logsumexp(z) - sum_c y_hat_c z_c with the sum gathered at those ids.
"""

from __future__ import annotations

import torch
from torch import nn

from harness import distributed

VOCAB_SIZE = 49408  # CLIP BPE: 49,406 merges and bytes + start-of-text + end-of-text
MIN_TARGET_MASS = 1e-12
LOGSUMEXP_BLOCK_ELEMENTS = 1 << 21  # 8 MB of float32 per block: a CPU core's L2 holds it


def multi_hot(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The multi-hot y in sparse form: ``(rows, ids, y)`` with one entry per caption position,
    y = 1 at the first occurrence of an id in its caption and 0 at its repeats.

    Sort-based: after sorting each row, an id is new where it differs from its left neighbour.
    The repeats are kept as explicit zeros rather than dropped: the entry count is then B x L
    whatever the captions, and dropping them would make the host wait for the GPU to count
    the distinct ids every step. Zeros add nothing to any sum below.
    """
    ids, _ = text.sort(dim=1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    return rows.reshape(-1), ids.reshape(-1), first.reshape(-1).to(torch.float64)


class OnlineIDF(nn.Module):
    """Document frequencies as fractions of captions, in float64, plus the number of updates."""

    def __init__(self, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.register_buffer("df", torch.zeros(vocab_size, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, ids: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        """Add the global batch's column mean of y (from ``multi_hot``) to ``df`` and 1 to
        ``steps``.

        One collective: the local column mean and the counter increment are averaged across
        ranks together (equal per-rank batches, so the average is the global column mean).
        """
        delta = torch.zeros(self.df.numel() + 1, dtype=torch.float64, device=self.df.device)
        delta.index_add_(0, ids, y / batch)
        delta[-1:].fill_(1.0)  # a slice's fill: assigning a Python number would copy it over
        distributed.all_reduce_mean_(delta)
        self.df += delta[:-1]
        self.steps += delta[-1]

    def weights(self, global_batch: int) -> torch.Tensor:
        """w_c = log((n + 1/N) / (df_c + 1/N)) = log((samples_seen + 1) / (DF_c + 1))."""
        eps = 1.0 / global_batch
        return torch.log((self.steps + eps) / (self.df + eps))


def soft_targets(
    rows: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, batch: int
) -> torch.Tensor:
    """y_hat at each entry: y w_id / max(sum of y w over the row, 1e-12) (w >= 0)."""
    w = weights[ids] * y
    mass = torch.zeros(batch, dtype=w.dtype, device=w.device).index_add_(0, rows, w)
    return w / mass.clamp_min(MIN_TARGET_MASS)[rows]


def soft_cross_entropy(
    logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """-(1/B) sum_i sum_c y_hat_ic log softmax(z_i)_c, in float32, from the sparse targets.

    -sum_c y_hat_c (z_c - lse) = (sum_c y_hat_c) lse - sum_c y_hat_c z_c; the target mass is 1,
    or 0 for a caption whose every id has weight 0 (it then adds nothing).
    """
    if torch.compiler.is_compiling():  # inductor fuses autograd's buffers itself
        return composed_soft_cross_entropy(logits, rows, ids, targets)
    return _SoftCrossEntropy.apply(logits, rows, ids, targets)


def composed_soft_cross_entropy(
    logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The same loss from autograd's ops alone: what torch.compile traces, and the reference
    the hand-written backward is checked against."""
    z, t = logits.float(), targets.float()
    lse, mass, dot = _row_terms(z, rows, ids, t)
    return (mass * lse - dot).mean()


def _row_terms(z, rows, ids, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per caption: logsumexp(z), the target mass sum_c y_hat_c, and sum_c y_hat_c z_c."""
    mass = torch.zeros(z.shape[0], device=z.device).index_add(0, rows, t)
    dot = torch.zeros(z.shape[0], device=z.device).index_add(0, rows, t * z[rows, ids])
    return logsumexp_rows(z), mass, dot


def logsumexp_rows(z: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(z, dim=1)``, on CPU a block of rows at a time.

    logsumexp materialises z - max(z) as a temporary the size of z: 100 MB at batch 512, which
    streams through memory. A block of rows keeps it in a core's cache: 38 -> 14 ms at batch
    512 on the 2-core CPU (median of 20 calls each), with each row reduced as before (the same
    bits there). On a GPU the extra launches would cost more than they save, and inductor fuses
    the temporary away.
    """
    if z.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.logsumexp(z, dim=1)
    rows_per_block = max(1, LOGSUMEXP_BLOCK_ELEMENTS // z.shape[1])
    return torch.cat([torch.logsumexp(block, dim=1) for block in z.split(rows_per_block)])


class _SoftCrossEntropy(torch.autograd.Function):
    """``soft_cross_entropy`` with a hand-written backward over one B x V buffer.

    The gradient, (g / B) * (mass_i softmax(z_i)_c - y_hat_ic), is what autograd computes from
    the forward, bit for bit (a test checks), in the same order of float operations. Autograd
    builds it from five B x V tensors (z - lse, its exp, the product, a zero tensor for the
    gathered term, the sum); here it is one, filled in place. At batch 512 those are 100 MB
    each, so this saves about 20 ms of superclip's 540 ms step on a 2-core CPU.
    """

    @staticmethod
    def forward(ctx, logits, rows, ids, targets):
        z, t = logits.float(), targets.float()
        lse, mass, dot = _row_terms(z, rows, ids, t)
        ctx.save_for_backward(z, lse, mass, rows, ids, t)
        ctx.logits_dtype = logits.dtype
        return (mass * lse - dot).mean()

    @staticmethod
    def backward(ctx, grad):
        z, lse, mass, rows, ids, t = ctx.saved_tensors
        per_row = grad.expand(z.shape[0]) / z.shape[0]  # the mean's backward
        dz = torch.sub(z, lse[:, None]).exp_().mul_((per_row * mass)[:, None])
        dz.index_put_((rows, ids), -per_row[rows] * t, accumulate=True)
        return dz.to(ctx.logits_dtype), None, None, None


class TokenClassifier(nn.Module):
    """The head and the IDF state: pooled patch features -> logits over the vocabulary."""

    def __init__(self, width: int, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, vocab_size)
        nn.init.normal_(self.linear.weight, std=width**-0.5)
        nn.init.zeros_(self.linear.bias)
        self.idf = OnlineIDF(vocab_size)

    def forward(self, pooled: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pooled``: mean of the patch tokens after the final norm; ``text``: padded ids.

        Updates the IDF state (before weighting, current batch included) and returns the
        logits with the sparse soft targets.
        """
        batch = text.shape[0]
        rows, ids, y = multi_hot(text)
        self.idf.update(ids, y, batch)
        weights = self.idf.weights(batch * distributed.world_size())
        return {
            "cls_logits": self.linear(self.norm(pooled)),
            "cls_rows": rows,
            "cls_ids": ids,
            "cls_targets": soft_targets(rows, ids, y, weights, batch),
        }

    @staticmethod
    def loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return soft_cross_entropy(
            outputs["cls_logits"], outputs["cls_rows"], outputs["cls_ids"], outputs["cls_targets"]
        )
