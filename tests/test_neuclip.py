"""neuclip (methods/neuclip.py): its pure pieces against hand computations, then its state
(queue, restarts, prototypes) within one process, across processes and through a checkpoint."""

import math

import gin
import pytest
import torch
import torch.nn.functional as F

from harness import config
from methods.neuclip import (
    NeuClip,
    adagrad_npn_steps,
    log_normalisers,
    npn_alpha,
    npn_gradient,
    npn_objective,
    rgcl_objective,
)
from tests.conftest import REPO
from tests.dist_utils import build, make_batch, one_step, run_distributed
from tests.test_methods import assert_close_to_scale

EPS, RHO = 1e-6, 8.0
CONSTANTS = ("num_prototypes", "npn_steps", "restart_every", "npn_lr", "adagrad_eps", "eps", "rho",
             "lr_tau_ratio", "tau_min")  # fmt: skip


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def pairs(n: int, d: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image/text embeddings whose pairs are correlated, as after some training."""
    image = unit(n, d, seed)
    return image, F.normalize(image + noise * unit(n, d, seed + 1), dim=-1)


def direct_rgcl(image, text, theta, *, eps, rho):
    """mean_i tau [log(eps + g1_i) + log(eps + g2_i)] + 2 rho tau, written out naively."""
    tau = 1 / theta.exp()
    sim = image @ text.T
    positive = sim.diag()
    others = ~torch.eye(len(sim), dtype=torch.bool)
    count = len(sim) - 1
    g1 = (torch.exp((sim - positive[:, None]) / tau) * others).sum(1) / count
    g2 = (torch.exp((sim.T - positive[:, None]) / tau) * others).sum(1) / count
    return tau * (torch.log(eps + g1) + torch.log(eps + g2)).mean() + 2 * rho * tau


@pytest.mark.parametrize("tau", [0.07, 0.01])
def test_F_with_exact_alpha_equals_the_direct_loss_in_value_and_gradient(tau):
    """a = the in-batch log(eps + g) (stop-gradient) makes F = mean tau log(eps + g) + 2 rho tau,
    and by the envelope theorem its gradient too (features and the temperature).

    The reference is float64; at tau = 0.01 the naive float32 exp((s_ij - s_ii) / tau) overflows
    (asserted), so this also checks the log-sum-exp stabilisation."""
    image, text = pairs(16, 8, seed=0, noise=4.0)  # weakly paired: hard negatives
    theta = torch.tensor(math.log(1 / tau))
    leaves = [x.clone().requires_grad_() for x in (image, text, theta)]
    scale = leaves[2].exp()
    norms = log_normalisers(*leaves[:2], *leaves[:2], tau=1 / scale, eps=EPS, offset=0)
    ours = rgcl_objective(*norms, *(n.detach() for n in norms), tau=1 / scale, rho=RHO)
    ours_grads = torch.autograd.grad(ours, leaves)

    ref_leaves = [x.double().requires_grad_() for x in (image, text, theta)]
    reference = direct_rgcl(*ref_leaves, eps=EPS, rho=RHO)
    ref_grads = torch.autograd.grad(reference, ref_leaves)

    if tau == 0.01:
        sim = image @ text.T
        assert torch.exp((sim - sim.diag()[:, None]) / tau).isinf().any()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, got, want in zip(("image", "text", "theta"), ours_grads, ref_grads, strict=True):
        assert_close_to_scale(got.double(), want, name, rel=1e-4)  # float32 vs float64


@pytest.mark.parametrize("tau", [0.07, 0.01])
def test_the_closed_form_npn_gradient_equals_autograd_per_side_and_stacked(tau):
    """npn_gradient against autograd through npn_objective(npn_alpha(...)), for each side alone
    and for both sides stacked (as the method runs them); prototypes of unequal norms, so the
    gradient through the prototype normalisation is exercised."""
    image, text = pairs(24, 16, seed=11)
    tau = torch.tensor(tau)
    norms = log_normalisers(image, text, image, text, tau=tau, eps=EPS, offset=0)
    positive = (image * text).sum(-1)
    protos = [unit(40, 16, seed=s) * torch.rand(40, 1, generator=torch.Generator().manual_seed(s))
              + 0.5 for s in (12, 13)]  # fmt: skip
    expected = []
    for anchor, w, log_norm in zip((image, text), protos, norms, strict=True):
        leaf = w.clone().requires_grad_()
        objective = npn_objective(npn_alpha(anchor, positive, leaf, tau=tau, eps=EPS), log_norm)
        (want,) = torch.autograd.grad(objective, leaf)
        got = npn_gradient(anchor, positive, w, log_norm, tau=tau, eps=EPS)
        assert_close_to_scale(got.double(), want.double(), "prototype gradient", rel=1e-4)
        expected.append(want)
    stacked = npn_gradient(torch.stack([image, text]), positive, torch.stack(protos),
                           torch.stack(norms), tau=tau, eps=EPS)  # fmt: skip
    for side, want in enumerate(expected):
        assert_close_to_scale(stacked[side].double(), want.double(), f"side {side}", rel=1e-4)


def test_T_u_adagrad_steps_reduce_the_npn_objective_on_a_fixed_batch():
    """With the method's defaults (T_u = 10, lr 0.1), from random prototypes and zero AdaGrad
    state, one step's T_u AdaGrad steps close >= 90% of the gap to the optimum, mean(log(eps+g))+1."""
    defaults = NeuClip()
    image, text = pairs(32, 32, seed=3)
    tau = torch.tensor(0.07)
    log_norm, _ = log_normalisers(image, text, image, text, tau=tau, eps=EPS, offset=0)
    positive = (image * text).sum(-1)
    prototypes, sumsq = unit(64, 32, seed=5), torch.zeros(64, 32)

    def objective():
        return npn_objective(npn_alpha(image, positive, prototypes, tau=tau, eps=EPS), log_norm)

    optimum = (log_norm + 1).mean().item()
    before = objective().item()
    adagrad_npn_steps(
        prototypes, sumsq, image, positive, log_norm, tau=tau, eps=EPS, lr=defaults.npn_lr,
        steps=defaults.npn_steps, adagrad_eps=defaults.adagrad_eps,
    )  # fmt: skip
    after = objective().item()
    assert defaults.npn_steps == 10 and defaults.npn_lr == 0.1
    assert optimum - 1e-6 <= after < before
    assert after - optimum < 0.1 * (before - optimum), (before, after, optimum)


@pytest.mark.parametrize("tau", [0.07, 0.01])
def test_alpha_with_the_batch_as_prototypes_matches_the_in_batch_normaliser(tau):
    """m = N, W1 = the batch's text embeddings: a_i counts the positive (e^0 = 1) and divides by
    N, while log(eps + g_i) leaves it out and divides by N - 1. Hence exactly
        a_i = log(eps + (1 + (N - 1) g_i) / N),
    checked to float32 round-off: 1e-6 / tau, since the exponents (s_ij - s_ii) / tau reach 2 / tau
    and carry ~6e-8 relative error each (1.4e-5 at tau = 0.07, 1e-4 at tau = 0.01). And the gap
    is bounded by the exclusion alone, per row:
        -log(N / (N - 1)) <= a_i - log(eps + g_i) <= log(1 + 1 / (N (eps + g_i)))
    (at N = 64 and tau = 0.07 that is within 0.016 below and 1 / (N g_i) above)."""
    n = 64
    image, text = pairs(n, 16, seed=7)
    tau = torch.tensor(tau)
    log_norm, _ = log_normalisers(image, text, image, text, tau=tau, eps=EPS, offset=0)
    alpha = npn_alpha(image, (image * text).sum(-1), text, tau=tau, eps=EPS)

    g = log_norm.double().exp() - EPS
    exact = torch.log(EPS + (1 + (n - 1) * g) / n)
    tolerance = 1e-6 / tau.item()
    assert ((alpha.double() - exact).abs() <= tolerance).all()
    gap = (alpha - log_norm).double()
    assert (gap >= -math.log(n / (n - 1)) - tolerance).all()
    assert (gap <= torch.log1p(1 / (n * (EPS + g))) + tolerance).all()


def fake_outputs(seed: int, n: int = 8, d: int = 32, scale: float = 1 / 0.07) -> dict:
    image, text = pairs(n, d, seed)
    return {"image": image, "text": text, "logit_scale": torch.tensor(scale)}


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same rows, in any order (a restart puts queued rows in a random order)."""
    match = (a[:, None, :] == b[None, :, :]).all(-1)
    return a.shape == b.shape and bool(match.any(0).all() and match.any(1).all())


def test_queue_and_restarts(micro_cfg):
    """m = 12, T_r = 3, batches of 8, no AdaGrad steps (so a restart's rows stay visible):
    restart at step 0 (the first batch), when the queue first fills (step 1), then at step 3."""
    method = NeuClip(num_prototypes=12, restart_every=3, npn_steps=0)
    method.build_model(micro_cfg)
    batches = [fake_outputs(seed) for seed in range(5)]
    method.loss(batches[0])
    assert method.counts == {"step": 1, "queue_fill": 8, "queue_ptr": 8, "num_active": 8}
    assert same_rows(method.w1[:8], batches[0]["text"])
    assert same_rows(method.w2[:8], batches[0]["image"])

    method.loss(batches[1])  # FIFO wraps: rows 8..11, 0..3 <- batch 1; batch 0's last 4 remain
    assert method.counts == {"step": 2, "queue_fill": 12, "queue_ptr": 4, "num_active": 12}
    newest = torch.cat([batches[0]["text"][4:], batches[1]["text"]])
    assert same_rows(method.queue_text, newest) and same_rows(method.w1, newest)
    assert torch.equal(method.queue_text[8:], batches[1]["text"][:4])

    w1 = method.w1.clone()
    method.loss(batches[2])  # step 2: no restart
    assert torch.equal(method.w1, w1)
    method.loss(batches[3])  # step 3: restart from the queue (batch 2's 8 rows + batch 3's)
    assert same_rows(method.w1, method.queue_text) and not torch.equal(method.w1, w1)
    assert method.step.item() == 4 and method.counts["step"] == 4  # buffers mirror the counters

    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.eval()  # an evaluation-mode loss leaves the state alone
    method.loss(batches[4])
    assert all(torch.equal(v, state[k]) for k, v in method.state_dict().items())


def test_state_dict_round_trip_restores_the_counters_and_the_next_step(micro_cfg):
    first = NeuClip(num_prototypes=12, restart_every=2)
    first.build_model(micro_cfg)
    for seed in range(3):
        first.loss(fake_outputs(seed))
    second = NeuClip(num_prototypes=12, restart_every=2)
    second.build_model(micro_cfg)
    second.load_state_dict(first.state_dict())
    assert second.counts == first.counts
    a, b = first.loss(fake_outputs(9)), second.loss(fake_outputs(9))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


def test_loss_at_the_temperature_floor_is_finite_and_logs_the_normaliser(micro_cfg):
    method = NeuClip()
    method.build_model(micro_cfg)
    terms = method.loss(fake_outputs(0, scale=100.0))
    assert set(terms) == {"rgcl_loss", "alpha_mean", "log_norm_mean", "normaliser_gap", "tau"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["tau"].item() == pytest.approx(0.01)
    signed = (terms["alpha_mean"] - terms["log_norm_mean"]).abs()
    assert terms["normaliser_gap"] >= signed - 1e-6  # mean |gap| >= |mean gap|


def test_tau_has_its_own_group_and_floor(micro_cfg):
    method = NeuClip(lr_tau_ratio=0.25, tau_min=0.02)
    model = method.build_model(micro_cfg)
    groups = method.param_groups(model, lr=1e-3, weight_decay=0.1)
    (tau_group,) = [g for g in groups if g["group"] == "tau"]
    assert tau_group["params"] == [model.logit_scale] and tau_group["names"] == [
        "model.logit_scale"
    ]
    assert tau_group["lr"] == pytest.approx(2.5e-4) and tau_group["weight_decay"] == 0
    assert sum(p is model.logit_scale for g in groups for p in g["params"]) == 1
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    method.after_step(model)
    assert model.logit_scale.exp().item() == pytest.approx(50.0)  # 1 / tau_min


def test_every_constant_is_in_the_operative_config():
    config.parse([REPO / "configs/smoke.gin"], ["METHOD='neuclip'"])
    method = config.configured_method("neuclip")
    operative = gin.operative_config_str()
    for name in CONSTANTS:
        assert f"neuclip.{name} = " in operative, name
    assert method.num_prototypes == 256  # the CPU configs' m (configs/methods/neuclip.gin)


def test_out_of_range_constant_is_named():
    with pytest.raises(ValueError, match=r"neuclip\.restart_every=0"):
        NeuClip(restart_every=0)


@pytest.mark.dist
def test_two_processes_hold_the_single_process_prototypes(micro_cfg, tmp_path):
    """Three steps with m = 12, T_r = 2: restarts at steps 0, 1 (queue full) and 2. Every rank
    holds identical state, equal to the one-process state to float32 round-off; loss and
    gradients equal too. AdaGrad lr 0.01 here: at the default 0.1 the inner loop amplifies the
    encoders' round-off ~1e3-fold on this untrained model (see GRAD_RTOL in test_methods.py)."""
    bindings = ["neuclip.num_prototypes = 12", "neuclip.restart_every = 2", "neuclip.npn_lr = 0.01"]
    batch = make_batch(8, 32, 36)
    single = build("neuclip", micro_cfg, bindings)
    single_loss, _, single_grads = one_step(single, batch, steps=3)
    ranks = run_distributed("neuclip", micro_cfg, bindings, batch, world=2, out=tmp_path, steps=3)
    state = single.method.state_dict()
    assert single.method.counts == {"step": 3, "queue_fill": 12, "queue_ptr": 0, "num_active": 12}
    for result in ranks:
        assert result["loss"].item() == pytest.approx(single_loss.item(), abs=1e-5)
        for key, grad in single_grads.items():
            assert_close_to_scale(result["grads"][key], grad, key)
        for key, value in state.items():
            assert torch.equal(result["state"][key], ranks[0]["state"][key]), key
            if value.is_floating_point():
                assert_close_to_scale(result["state"][key], value, key)
            else:
                assert torch.equal(result["state"][key], value), key


def test_costs_count_the_prototypes_and_a_full_queue(micro_cfg):
    """The NPN's 2*m*d prototypes are parameters in costs.json, and FLOPs are counted with m
    prototypes (queue full), not with m_eff = N at the first step."""
    import contextlib

    from harness.costs import count_costs
    from tests.dist_utils import build

    def costs(m):
        step = build("neuclip", micro_cfg, [f"neuclip.num_prototypes={m}"])
        return count_costs(step, per_rank_batch=8, image_size=32, context_length=36,
                           device=torch.device("cpu"), autocast_ctx=contextlib.nullcontext())  # fmt: skip

    small, large = costs(16), costs(64)
    dim = micro_cfg["embed_dim"]
    assert small["params_method_learned_buffers"] == 2 * 16 * dim
    assert large["params_trainable"] - small["params_trainable"] == 2 * (64 - 16) * dim
    assert large["train_flops_warmup_steps"] == 8  # 64 prototypes / 8 samples per step
    assert large["train_flops_per_sample"] > small["train_flops_per_sample"]  # more prototypes
