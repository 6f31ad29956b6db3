"""``TrainConfig.grad_checkpointing``: the same gradients for the memory of one block at a time.

Also the FLOP count of a recomputing model: it must not keep the recomputed activations alive
(FlopCounterMode's module tracker did: 77.2 GiB for a ViT-L/14 step that trains in 14.9 GiB).
"""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch.utils.flop_counter import FlopCounterMode

import methods
from bench.cell import build_cell, cell_bindings
from harness.costs import total_flop_counter
from harness.data.loader import prepare_batch
from harness.errors import ConfigError
from harness.models import build_clip
from harness.step import TrainStep, enable_grad_checkpointing
from tests.dist_utils import make_batch


def default_block_cfg(micro_cfg: dict) -> dict:
    """micro-vit with open_clip's default blocks (its own config asks for custom ones)."""
    cfg = copy.deepcopy(micro_cfg)
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower].pop("block_type")
        cfg[tower]["layers"] = 2
    return cfg


def micro_batch() -> dict[str, torch.Tensor]:
    return prepare_batch(make_batch(8, 32, 36), torch.device("cpu"))


def clip_step(cfg: dict, *, recompute: bool) -> TrainStep:
    torch.manual_seed(0)
    model = build_clip(cfg)
    if recompute:
        enable_grad_checkpointing(model)
    return TrainStep(model, methods.build_method("clip"))


def test_recomputation_runs_every_block_twice_and_gives_the_same_gradients(micro_cfg, monkeypatch):
    cfg = default_block_cfg(micro_cfg)
    batch = micro_batch()
    count = [0]
    forward = ResidualAttentionBlock.forward

    def counted(self, *args, **kwargs):
        count[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ResidualAttentionBlock, "forward", counted)  # hooks do not see recompute
    grads, calls = {}, {}
    for recompute in (False, True):
        step = clip_step(cfg, recompute=recompute)
        blocks = [m for m in step.modules() if isinstance(m, ResidualAttentionBlock)]
        count[0] = 0
        step(batch)["loss"].backward()
        calls[recompute] = count[0] / len(blocks)
        grads[recompute] = {n: p.grad for n, p in step.named_parameters() if p.grad is not None}
    assert calls == {False: 1.0, True: 2.0}  # recomputed in backward
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], msg=name)


def test_custom_blocks_are_refused_by_name(micro_cfg):
    with pytest.raises(ConfigError, match=r"grad_checkpointing.*CustomResidualAttentionBlock"):
        enable_grad_checkpointing(build_clip(micro_cfg))  # micro-vit: block_type custom


def test_the_trainer_applies_the_option(tiny_data, tmp_path):
    # micro-vit's custom blocks cannot recompute: the refusal shows the trainer asked for it
    bindings = cell_bindings(
        "clip", 16, model="micro-vit", steps=2, workdir=tmp_path, data=str(tiny_data),
        extra=["DataConfig.num_workers = 0", "TrainConfig.grad_checkpointing = True"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"TrainConfig\.grad_checkpointing"):
        build_cell(bindings, run_dir=tmp_path / "run")


def test_flop_count_keeps_no_module_hooks_and_the_same_total(micro_cfg):
    step = clip_step(default_block_cfg(micro_cfg), recompute=True)
    batch = micro_batch()
    with FlopCounterMode(display=False) as reference:
        step(batch)["loss"].backward()
    hooks = torch.nn.modules.module._global_forward_hooks
    with total_flop_counter() as counter:
        # the module tracker's global hooks put backward hooks on every recomputed output
        assert len(hooks) == 0, "FlopCounterMode's module tracker is back"
        step(batch)["loss"].backward()
    assert counter.get_total_flops() == reference.get_total_flops() > 0
