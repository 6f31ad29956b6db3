"""Student options of siclip: SAS-P blocks, adjacent-block weight sharing, weight inheritance.

SAS-P (He & Hofmann 2023, "Simplifying Transformer Blocks"): parallel attention and MLP from one
pre-norm, no skip connections, shaped attention A = alpha I + beta (softmax(QK'/sqrt(d) + M) - C)
per head, with W_Q = 0 and alpha = beta = 1 at init so that A = I. The [decision]s (causal mask,
identity at init) are listed in methods/siclip.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from harness import models
from harness.errors import ConfigError

TOWERS = ("none", "vision", "text", "both")
SAS_P_MLP_GAIN = 0.1  # the authors' beta_FF initialisation


class SasPBlock(nn.Module):
    """Parallel, skipless transformer block with shaped attention (SAS-P, He & Hofmann 2023).

    out = A LN(x) + beta_FF MLP(LN(x)); per head A = alpha I + beta (softmax(QK'/sqrt(d) + M) - C),
    C = softmax(M) (the attention of zero queries). Values and output projection are the identity.
    With W_Q = 0, alpha = beta = 1 at init, A = I exactly. Drop-in for open_clip's
    ``ResidualAttentionBlock`` or ``CustomResidualAttentionBlock`` inside a batch-first
    ``Transformer`` (self-attention only).
    """

    def __init__(self, width: int, heads: int, mlp_width: int, *, act_layer, norm_layer):
        super().__init__()
        if width % heads:
            raise models.ModelError(f"SAS-P: width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.ln_1 = norm_layer(width)
        self.attn_q = nn.Linear(width, width)
        self.attn_k = nn.Linear(width, width)
        nn.init.zeros_(self.attn_q.weight)  # zero queries: softmax(M) = C, so A = I at init
        nn.init.zeros_(self.attn_q.bias)
        self.identity_gain = nn.Parameter(torch.ones(heads))  # alpha
        self.attention_gain = nn.Parameter(torch.ones(heads))  # beta, also on C
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_width),
                gelu=act_layer(),
                c_proj=nn.Linear(mlp_width, width),
            )
        )
        self.mlp_gain = nn.Parameter(torch.tensor(SAS_P_MLP_GAIN))  # beta_FF

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer asks its first block
        return self.mlp.c_fc.weight.dtype

    def attention_matrix(self, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """A for normalised input ``h`` (B, T, W): shape (B, heads, T, T)."""
        b, t, w = h.shape
        q = self.attn_q(h).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.attn_k(h).view(b, t, self.heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads)
        mask = _additive_mask(attn_mask, b, self.heads, t, h.dtype, h.device)
        centre = torch.softmax(mask.expand(-1, -1, t, t), dim=-1)
        shaped = torch.softmax(scores + mask, dim=-1) - centre
        eye = torch.eye(t, dtype=h.dtype, device=h.device)
        alpha = self.identity_gain.view(1, -1, 1, 1)
        beta = self.attention_gain.view(1, -1, 1, 1)
        return alpha * eye + beta * shaped

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            raise NotImplementedError("SAS-P blocks do self-attention only")
        h = self.ln_1(q_x)
        b, t, w = h.shape
        values = h.view(b, t, self.heads, -1).transpose(1, 2)  # W_V = I: heads split LN(x)
        mixed = (self.attention_matrix(h, attn_mask) @ values).transpose(1, 2).reshape(b, t, w)
        return mixed + self.mlp_gain * self.mlp(h)


def _additive_mask(mask, b: int, heads: int, t: int, dtype, device) -> torch.Tensor:
    """open_clip's mask (None, bool or additive; (T, T) or (B*heads, T, T)) as (B|1, H|1, T|1, T)."""
    if mask is None:
        return torch.zeros(1, 1, 1, t, dtype=dtype, device=device)
    if mask.dtype == torch.bool:  # True = may not attend, as in open_clip's Attention
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
    mask = mask.to(dtype)
    if mask.ndim == 3:
        return mask.reshape(b, heads, t, t)
    return mask.view(1, 1, t, t)


# ---------------------------------------------------------------- student surgery


def towers(model: nn.Module, which: str) -> list[nn.Module]:
    """The ``Transformer`` modules (vision and/or text) that ``which`` names."""
    if which not in TOWERS:
        raise ConfigError(f"siclip tower choice {which!r}; choose one of {TOWERS}")
    vision = model.visual.transformer
    text = model.transformer if hasattr(model, "transformer") else model.text.transformer
    return {"none": [], "vision": [vision], "text": [text], "both": [vision, text]}[which]


def use_sas_p_blocks(transformer: nn.Module) -> None:
    """Replace every block of an open_clip ``Transformer`` by a SAS-P block of the same sizes."""
    if not transformer.batch_first:
        raise models.ModelError("SAS-P blocks need a batch-first open_clip Transformer")
    for i, block in enumerate(transformer.resblocks):
        replaceable = (ResidualAttentionBlock, CustomResidualAttentionBlock)
        if not isinstance(block, replaceable) or hasattr(block, "ln_1_kv"):
            raise models.ModelError(f"SAS-P cannot replace block {i} ({type(block).__name__})")
        transformer.resblocks[i] = SasPBlock(
            block.ln_1.normalized_shape[0], block.attn.num_heads, block.mlp.c_fc.out_features,
            act_layer=type(block.mlp.gelu), norm_layer=type(block.ln_1),
        )  # fmt: skip


def share_adjacent_blocks(transformer: nn.Module) -> None:
    """Blocks 2k and 2k+1 become one module: one set of parameters, applied twice in a row."""
    blocks = transformer.resblocks
    for k in range(0, len(blocks) - 1, 2):
        blocks[k + 1] = blocks[k]


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Copy teacher tensors into the student where names and shapes match; returns how many."""
    source = teacher.state_dict()
    target = student.state_dict()
    copied = 0
    for name, tensor in target.items():
        if name in source and source[name].shape == tensor.shape:
            tensor.copy_(source[name])
            copied += 1
    return copied
