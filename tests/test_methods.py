"""Every registered method, through the same checks (a new method is covered automatically)."""

import pytest
import torch
from open_clip.loss import ClipLoss

import methods
from methods.common import clip_loss
from tests.dist_utils import build, make_batch, one_step, run_distributed

METHODS = methods.registered_names()
# every registered method in every configuration it declares (superclass's LiT phase, siclip's
# student options...): a new method or variant is covered without a new test
CASES = [
    pytest.param(name, variant, id=name if variant in ("default", "cls") else f"{name}-{variant}")
    for name in METHODS
    for variant in methods.method_class(name).example_variants
]


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(methods.UnknownMethodError) as err:
        methods.build_method("clipp")
    for name in METHODS:
        assert name in str(err.value)


def test_clip_loss_equals_open_clip_cliploss():
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    scale = torch.tensor(14.3)
    ours = clip_loss(image, text, scale)
    reference = ClipLoss()(image, text, scale)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_step_gives_finite_loss_and_gradients(name, variant, micro_cfg, method_bindings):
    step = build(name, micro_cfg, method_bindings(name, variant))
    batch = make_batch(8, 32, 36)
    loss, terms, grads = one_step(step, batch)
    assert torch.isfinite(loss)
    assert any(k.endswith("_loss") for k in terms)
    trainable = {n for n, p in step.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(grads), "every trainable parameter must get a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_param_groups_cover_every_trainable_parameter_once(
    name, variant, micro_cfg, method_bindings
):
    step = build(name, micro_cfg, method_bindings(name, variant))
    groups = step.method.param_groups(step.model, lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in step.parameters() if p.requires_grad}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert any("logit_scale" in n for n in no_decay) or not hasattr(step.model, "logit_scale")
    assert all(
        "bias" not in n.rsplit(".", 1)[-1]
        for g in groups
        if g["weight_decay"] > 0
        for n in g["names"]
    )


# Gradient tolerance of the 1-vs-2-process check, relative to each tensor's scale: 5e-5 (a scalar
# gain such as SAS-P's mlp_gain sums over every token of the batch and showed 1.5e-5; a real
# distribution bug -- a missing gather, a wrong label offset, an unsynchronised buffer -- gives
# errors of order 1), unless
# the method's own state amplifies the encoders' float32 round-off. neuclip: its T_u = 10 AdaGrad
# steps on the prototypes move every coordinate by up to lr whatever the size of its gradient, so
# on this untrained model (image embeddings all within cos 0.97 of each other) round-off in step
# 1's features shifts step 2's prototypes ~1e3-fold more (measured 1.2e-4 on the gradients).
# tests/test_neuclip.py checks the same plumbing at 1e-5 with lr 0.01, prototypes included.
GRAD_RTOL = {"neuclip": 1e-3}


@pytest.mark.dist
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_two_gloo_processes_equal_one_process(name, variant, micro_cfg, method_bindings, tmp_path):
    """Loss (averaged over ranks) and DDP-averaged gradients equal the single-process step."""
    batch = make_batch(8, 32, 36)
    bindings = method_bindings(name, variant)
    single_loss, _, single_grads = one_step(build(name, micro_cfg, bindings), batch, steps=2)
    ranks = run_distributed(name, micro_cfg, bindings, batch, world=2, out=tmp_path, steps=2)
    for result in ranks:
        # float32 round-off grows with the loss: relative (siclip's loss is ~100), or absolute
        assert result["loss"].item() == pytest.approx(single_loss.item(), rel=1e-6, abs=1e-5)
        assert set(result["grads"]) == set(single_grads)
        for key, grad in single_grads.items():
            assert_close_to_scale(result["grads"][key], grad, key, rel=GRAD_RTOL.get(name, 5e-5))
    for key, value in ranks[0]["state"].items():  # method state identical on every rank
        other = ranks[1]["state"][key]
        assert torch.equal(other, value) if torch.is_tensor(value) else other == value, key


def assert_close_to_scale(actual, expected, name, rel=1e-5):
    """Equal up to float32 summation-order round-off, relative to the tensor's own scale."""
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale + 1e-7, f"{name}: max |diff| {err:.3g} vs scale {scale:.3g}"
