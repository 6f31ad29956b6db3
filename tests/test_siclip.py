"""siclip: its loss terms on hand-built inputs, the frozen teacher, the teacher stage and the
student options (weight sharing, SAS-P, inheritance). The registry-wide checks (finite step,
parameter groups, 2-process gloo equivalence) run in test_methods.py."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from harness import checkpoint, config, models
from harness.costs import count_costs, parameter_counts
from harness.optim import build_optimizer
from harness.planner import plan_run, shared_hash
from harness.run import run_config
from harness.specs import TrainConfig
from methods.common import cross_logits
from methods.siclip import (
    EOT_TOKEN,
    PairMatchingHead,
    SasPBlock,
    crd_loss,
    fd_loss,
    fit_context,
    gumbel_noise,
    pm_loss,
    sample_negatives,
    write_teacher_run_dir,
)
from methods.student_options import use_sas_p_blocks
from tests.conftest import REPO
from tests.dist_utils import build, make_batch, one_step


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random-init micro-vit-teacher (wider embedding and towers than micro-vit)."""
    cfg = models.model_config("micro-vit-teacher")
    return write_teacher_run_dir(tmp_path_factory.mktemp("teacher") / "run", cfg, seed=1)


def siclip_step(cfg, teacher_dir, *extra):
    return build("siclip", cfg, [f"siclip.teacher = '{teacher_dir}'", *extra])


def teacher_of(step):
    return step.method.frozen_modules()["teacher"]


# ---------------------------------------------------------------- loss terms


def test_crd_equals_open_clip_distill_term_minus_teacher_entropy():
    gen = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (
        F.normalize(torch.randn(12, 8, generator=gen), dim=-1) for _ in range(4)
    )
    s_scale, t_scale = torch.tensor(14.3), torch.tensor(30.0)
    student = cross_logits(s_img, s_txt, s_img, s_txt, s_scale)
    teacher = cross_logits(t_img, t_txt, t_img, t_txt, t_scale)
    ours = crd_loss(student, teacher)
    reference = DistillClipLoss()(s_img, s_txt, s_scale, t_img, t_txt, t_scale, output_dict=True)

    def entropy(logits):  # mean over rows of H(softmax(row)), computed independently
        p = logits.softmax(dim=1)
        return -(p * p.log()).sum(dim=1).mean()

    teacher_entropy = 0.5 * (entropy(teacher[0]) + entropy(teacher[1]))
    expected = reference["distill_loss"] - teacher_entropy
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    assert ours.item() > 0
    assert crd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_crd_gives_the_teacher_no_gradient():
    s = torch.randn(4, 4, requires_grad=True)
    t = torch.randn(4, 4, requires_grad=True)
    crd_loss((s, s.T), (t, t.T)).backward()
    assert s.grad is not None and t.grad is None


def test_fd_on_hand_built_inputs():
    # image: student (1,0) vs teacher (0,1): squared error 1 + 1 over 2 elements -> 1 per row
    # text: student (1,0) vs teacher (1,0): 0
    image, t_image = unit([1, 0], [1, 0]), unit([0, 1], [0, 1])
    text, t_text = unit([1, 0], [0, 1]), unit([1, 0], [0, 1])
    assert fd_loss(image, text, t_image, t_text).item() == pytest.approx(1.0)
    # 45 degrees: (1 - 1/sqrt2)^2 + (1/sqrt2)^2 = 2 - sqrt2 per row, over 2 elements
    half = fd_loss(unit([1, 0]), unit([1, 0]), unit([1, 1]), unit([1, 0]))
    assert half.item() == pytest.approx((2 - math.sqrt(2)) / 2, abs=1e-6)


def test_icl_on_hand_built_inputs(method_bindings, micro_cfg):
    """ICL = 1/2[CE(s_x F^S G^T', diag) + CE(s_x G^S F^T', diag)] with s_x = exp(theta_x)."""
    step = build("siclip", micro_cfg, method_bindings("siclip"))
    method = step.method
    s_x = method.icl_logit_scale.exp().item()
    assert s_x == pytest.approx(1 / 0.07)
    # student image 0 = teacher text 0, student image 1 orthogonal to both teacher texts
    f_s, g_s = unit([1, 0], [0, 1]), unit([1, 0], [1, 0])
    f_t, g_t = unit([1, 0], [1, 0]), unit([1, 0], [0, 1])

    def ce_row(sims, target):  # -log softmax by hand
        return -(s_x * sims[target] - math.log(sum(math.exp(s_x * v) for v in sims)))

    image_rows = [ce_row([1, 0], 0), ce_row([0, 1], 1)]  # F^S G^T'
    text_rows = [ce_row([1, 1], 0), ce_row([1, 1], 1)]  # G^S F^T'
    expected = 0.5 * (sum(image_rows) / 2 + sum(text_rows) / 2)
    outputs = {
        "image": f_s, "text": g_s, "image_proj": f_s, "text_proj": g_s,
        "teacher_image": f_t, "teacher_text": g_t, "logit_scale": torch.tensor(10.0),
        "teacher_logit_scale": torch.tensor(10.0), "icl_logit_scale": torch.tensor(s_x),
        "pm_noise": gumbel_noise(2, seed=0, step=0),
    }  # fmt: skip
    method.pm_head = PairMatchingHead(2)
    terms = method.loss(outputs)
    assert terms["icl_unweighted"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["icl_loss"].item() == pytest.approx(expected, rel=1e-5)  # weight 1
    assert terms["fd_loss"].item() == pytest.approx(2000 * terms["fd_unweighted"].item())


class CosineHead(torch.nn.Module):
    """A hand-built PM head: logits (0, k cos(f, g))."""

    def forward(self, f, g):
        z = 4.0 * (f * g).sum(-1)
        return torch.stack([torch.zeros_like(z), z], dim=-1)


def test_pm_loss_on_hand_built_inputs():
    # 3 orthonormal pairs: positives have cos 1, every negative cos 0
    image = text = torch.eye(3)
    negative_text, negative_image = text[[1, 2, 0]], image[[2, 0, 1]]
    loss = pm_loss(
        CosineHead(), image, text, negative_text=negative_text, negative_image=negative_image
    )
    positive = math.log(1 + math.exp(-4.0))  # CE of label "match" at logits (0, 4)
    negative = math.log(2)  # CE of label "no match" at logits (0, 0)
    assert loss.item() == pytest.approx((3 * positive + 6 * negative) / 9, rel=1e-6)


def test_pm_head_reads_f_g_product_and_absolute_difference():
    f, g = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    feats = PairMatchingHead.pair_features(f, g)
    assert feats.tolist() == [[1, -2, 3, 1, 3, -2, 2, 3]]
    assert PairMatchingHead(2)(f, g).shape == (1, 2)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the noise is drawn there


@pytest.mark.parametrize("device", DEVICES)
def test_negatives_follow_the_masked_softmax_of_their_row(device):
    logits = torch.tensor([[5.0, 1.0, 0.0, 2.0], [0.5, 9.0, 0.5, 1.5]], device=device)
    draws = 4000
    counts = torch.zeros(2, 4)
    for step in range(draws):
        noise = gumbel_noise(4, seed=3, step=step, draws=1, device=device)[0]
        assert noise.device.type == device
        picked = sample_negatives(logits, noise[:2], offset=0).cpu()
        counts[torch.arange(2), picked] += 1
    assert counts[0, 0] == 0 and counts[1, 1] == 0  # never the row's own pair
    masked = logits.cpu()
    masked[[0, 1], [0, 1]] = float("-inf")
    expected = masked.softmax(dim=1)
    assert torch.allclose(counts / draws, expected, atol=0.03)


def test_negatives_of_a_global_row_do_not_depend_on_the_rank_split():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 8, generator=gen)
    noise = gumbel_noise(8, seed=1, step=5)[0]
    whole = sample_negatives(logits, noise, offset=0)
    halves = [sample_negatives(logits[r : r + 4], noise[r : r + 4], offset=r) for r in (0, 4)]
    assert torch.equal(whole, torch.cat(halves))
    assert not torch.equal(
        whole, sample_negatives(logits, gumbel_noise(8, seed=1, step=6)[0], offset=0)
    )


def test_every_term_is_logged_and_the_weights_are_gin_configurable(teacher_dir, micro_cfg):
    batch = make_batch(6, 32, 36)
    base = siclip_step(micro_cfg, teacher_dir)
    _, terms, _ = one_step(base, batch)
    for key in ("contrastive_loss", "fd_loss", "crd_loss", "icl_loss", "pm_loss"):
        assert torch.isfinite(terms[key]), key
    for key in ("fd", "crd", "icl", "pm"):
        assert f"{key}_unweighted" in terms
    assert terms["fd_loss"].item() == pytest.approx(2000 * terms["fd_unweighted"].item(), rel=1e-5)
    heavy = siclip_step(micro_cfg, teacher_dir, "siclip.pm_weight = 3.0", "siclip.crd_weight = 0.0")
    _, terms, _ = one_step(heavy, batch)
    assert terms["pm_loss"].item() == pytest.approx(3 * terms["pm_unweighted"].item(), rel=1e-5)
    assert terms["crd_loss"].item() == 0.0


# ---------------------------------------------------------------- the teacher


def test_teacher_is_frozen_unseen_and_unchanged_by_training(teacher_dir, micro_cfg):
    step = siclip_step(micro_cfg, teacher_dir)
    teacher = teacher_of(step)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in step.parameters()}
    assert not any(k.startswith(("teacher", "_frozen")) for k in step.method.state_dict())
    optimizer, _ = build_optimizer(step.method, step.model, TrainConfig(lr=1e-2))
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    step.train()  # what the trainer does; the teacher must stay in eval mode
    batch = make_batch(6, 32, 36)
    from harness.data.loader import prepare_batch

    for _ in range(3):
        optimizer.zero_grad()
        step(prepare_batch(batch, torch.device("cpu")))["loss"].backward()
        optimizer.step()
        step.method.after_step(step.model)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    step.to(torch.float64)  # the teacher moves (and converts) with the method
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


def test_teacher_identity_is_in_the_checkpoint_and_checked(teacher_dir, micro_cfg, tmp_path):
    step = siclip_step(micro_cfg, teacher_dir)
    one_step(step, make_batch(4, 32, 36))
    path = checkpoint.save(tmp_path / "m.pt", {"method": step.method.state_dict()})
    saved = checkpoint.load(path)["method"]  # weights_only=True
    extra = saved["_extra_state"]
    assert extra["teacher"] == str(teacher_dir.resolve()) and len(extra["teacher_sha256"]) == 64
    assert extra["pm_step"] == 1
    again = siclip_step(micro_cfg, teacher_dir)
    checkpoint.load_state_strict(again.method, saved, "method state")
    assert again.method.get_extra_state() == extra
    other_dir = write_teacher_run_dir(
        tmp_path / "other", models.model_config("micro-vit-teacher"), seed=2
    )
    other = siclip_step(micro_cfg, other_dir)
    with pytest.raises(checkpoint.CheckpointError, match="trained with teacher"):
        other.method.load_state_dict(saved)
    info = step.method.info()
    assert info["teacher"]["sha256"] == extra["teacher_sha256"]
    assert info["label"] == "SiCLIP-style (reconstructed)"


def test_teacher_forward_is_in_the_step_flops_and_its_params_are_counted(teacher_dir, micro_cfg):
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = dict(per_rank_batch=4, image_size=32, context_length=36,
                  device=torch.device("cpu"), autocast_ctx=torch.autocast("cpu", enabled=False))  # fmt: skip
    siclip = siclip_step(micro_cfg, teacher_dir)
    clip = build("clip", micro_cfg, [])
    costs, clip_costs = count_costs(siclip, **kwargs), count_costs(clip, **kwargs)
    teacher = teacher_of(siclip)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert costs["params_teacher"] == n_teacher
    assert costs["params_frozen"] == n_teacher
    assert costs["params_model"] == clip_costs["params_model"]
    assert costs["params_total"] == costs["params_trainable"] + n_teacher
    batch = make_batch(4, 32, 36)
    from harness.data.loader import prepare_batch

    batch = prepare_batch(batch, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        siclip.method.teacher().embed(batch["image"], batch["text"])
    teacher_flops = counter.get_total_flops() / 4
    assert teacher_flops > 0
    extra = costs["train_flops_per_sample"] - clip_costs["train_flops_per_sample"]
    assert extra >= teacher_flops


def test_teacher_inputs_are_adapted_to_its_image_size_and_context(tmp_path, micro_cfg):
    tokens = torch.tensor([[49406, 5, 6, EOT_TOKEN, 0, 0], [49406, 5, 6, 7, 8, EOT_TOKEN]])
    assert fit_context(tokens, 8)[:, 6:].eq(0).all() and fit_context(tokens, 8).shape == (2, 8)
    cut = fit_context(tokens, 4)
    assert cut.tolist() == [[49406, 5, 6, EOT_TOKEN], [49406, 5, 6, EOT_TOKEN]]
    cfg = copy.deepcopy(models.model_config("micro-vit-teacher"))
    cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"] = 48, 40
    other = write_teacher_run_dir(tmp_path / "big", cfg)
    loss, _, _ = one_step(siclip_step(micro_cfg, other), make_batch(4, 32, 36))
    assert torch.isfinite(loss)


def test_stages_train_a_shared_teacher_unless_one_is_given(teacher_dir):
    smoke = [REPO / "configs/smoke.gin"]
    teacher, student = plan_run(smoke, ["METHOD='siclip'", "BATCH_SIZE=32"]).stages
    assert teacher.shared and teacher.name == "teacher"
    spec = teacher.spec
    assert (spec.run.method, spec.run.model) == ("clip", "tiny-vit-teacher")
    assert (spec.train.batch_size, spec.train.train_samples) == (512, 1280)
    assert dict(student.inputs) == {"siclip.teacher": "teacher"}
    assert student.spec.method.kwargs["teacher"] == str(teacher.run_dir.resolve())
    recomputing = ["METHOD='siclip'", "BATCH_SIZE=32", "siclip.teacher_grad_checkpointing=True"]
    teacher, student = plan_run(smoke, recomputing).stages
    assert teacher.spec.train.grad_checkpointing and not student.spec.train.grad_checkpointing
    stages = plan_run(smoke, ["METHOD='siclip'", f"siclip.teacher='{teacher_dir}'"]).stages
    assert [s.name for s in stages] == ["main"]


def test_teacher_stage_hash_ignores_the_students_hyperparameters():
    smoke = [REPO / "configs/smoke.gin"]
    config.parse(smoke, ["METHOD='clip'", "siclip.fd_weight = 1.0"])
    a = shared_hash(config.resolve(), world_size=1)
    config.parse(smoke, ["METHOD='clip'", "siclip.fd_weight = 5.0", "siclip.share_blocks='both'"])
    assert shared_hash(config.resolve(), world_size=1) == a
    config.parse(smoke, ["METHOD='clip'", "TrainConfig.lr = 5e-4"])
    assert shared_hash(config.resolve(), world_size=1) != a


# ---------------------------------------------------------------- student options


def three_block_cfg(micro_cfg):
    cfg = copy.deepcopy(micro_cfg)
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 3
    return cfg


def test_adjacent_blocks_share_one_set_of_parameters(teacher_dir, micro_cfg):
    cfg = three_block_cfg(micro_cfg)
    plain = siclip_step(cfg, teacher_dir)
    shared = siclip_step(cfg, teacher_dir, "siclip.share_blocks = 'both'")
    for tower in (shared.model.visual.transformer, shared.model.transformer):
        blocks = tower.resblocks
        assert blocks[0] is blocks[1] and blocks[2] is not blocks[0]  # odd last block unshared
        assert blocks[1].mlp.c_fc.weight is blocks[0].mlp.c_fc.weight
        assert blocks[1].mlp.c_fc.weight.data_ptr() == blocks[0].mlp.c_fc.weight.data_ptr()
    block = sum(p.numel() for p in plain.model.visual.transformer.resblocks[1].parameters())
    text_block = sum(p.numel() for p in plain.model.transformer.resblocks[1].parameters())
    n_plain = sum(p.numel() for p in plain.model.parameters())
    n_shared = sum(p.numel() for p in shared.model.parameters())
    assert n_plain - n_shared == block + text_block
    counts = parameter_counts(shared.model, shared.method)
    assert counts["params_model"] == n_shared
    assert shared.method.info()["student"]["params"] == n_shared
    loss, _, grads = one_step(shared, make_batch(4, 32, 36))
    assert torch.isfinite(loss)
    assert "model.visual.transformer.resblocks.0.mlp.c_fc.weight" in grads  # one entry per
    assert "model.visual.transformer.resblocks.1.mlp.c_fc.weight" not in grads  # parameter


def test_sas_p_block_is_identity_attention_at_init():
    torch.manual_seed(0)
    block = SasPBlock(16, 4, 64, act_layer=torch.nn.GELU, norm_layer=torch.nn.LayerNorm)
    x = torch.randn(3, 7, 16)
    causal = torch.full((7, 7), float("-inf")).triu(1)  # open_clip's text mask
    h = block.ln_1(x)
    assert block.mlp_gain.item() == pytest.approx(0.1)  # beta_FF: the MLP branch starts small
    for mask in (None, causal):
        attn = block.attention_matrix(h, mask)
        assert torch.equal(attn, torch.eye(7).expand(3, 4, 7, 7))  # A = I exactly
        assert torch.allclose(block(x, attn_mask=mask), h + 0.1 * block.mlp(h), atol=1e-6)
    with torch.no_grad():
        block.mlp_gain.zero_()
    for mask in (None, causal):  # the attention path alone is exactly the identity on LN(x)
        assert torch.equal(block(x, attn_mask=mask), h)
    # trained queries: still causal, rows still sum to alpha (softmax and C both sum to 1)
    torch.nn.init.normal_(block.attn_q.weight)
    attn = block.attention_matrix(h, causal)
    assert attn.triu(1).abs().max() == 0
    assert torch.allclose(attn.sum(-1), torch.ones(3, 4, 7), atol=1e-5)
    assert not torch.equal(attn, torch.eye(7).expand(3, 4, 7, 7))


@pytest.mark.parametrize("block_type", ["default", "custom"])
def test_sas_p_replaces_either_open_clip_block_type(micro_cfg, block_type):
    # the CPU configs use open_clip's custom (batch-first) block; open_clip names use the default
    cfg = copy.deepcopy(micro_cfg)
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower]["block_type"] = block_type
    model = models.build_clip(cfg)
    use_sas_p_blocks(model.transformer)
    assert all(isinstance(b, SasPBlock) for b in model.transformer.resblocks)
    tokens = torch.randint(1, 100, (2, models.context_length(cfg)))
    assert torch.isfinite(models.encode_text(model, tokens)).all()


def test_sas_p_student_has_fewer_parameters_and_trains(teacher_dir, micro_cfg):
    plain = siclip_step(micro_cfg, teacher_dir)
    sas = siclip_step(micro_cfg, teacher_dir, "siclip.sas_p_blocks = 'both'")
    assert all(isinstance(b, SasPBlock) for b in sas.model.visual.transformer.resblocks)
    assert all(isinstance(b, SasPBlock) for b in sas.model.transformer.resblocks)
    assert sum(p.numel() for p in sas.model.parameters()) < sum(
        p.numel() for p in plain.model.parameters()
    )
    loss, _, grads = one_step(sas, make_batch(4, 32, 36))
    assert torch.isfinite(loss) and "model.transformer.resblocks.0.attn_q.weight" in grads


def test_weight_inheritance_copies_tensors_whose_names_and_shapes_match(tmp_path, micro_cfg):
    same = write_teacher_run_dir(tmp_path / "same", micro_cfg, seed=7)
    step = siclip_step(micro_cfg, same, "siclip.inherit_from_teacher = True")
    teacher = teacher_of(step).state_dict()
    student = step.model.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    info = step.method.info()["student"]
    assert info["inherited_tensors"] == info["tensors"] == len(student)
    wider = siclip_step(
        micro_cfg, write_teacher_run_dir(tmp_path / "wide", models.model_config("micro-vit-teacher")),
        "siclip.inherit_from_teacher = True",
    )  # fmt: skip
    info = wider.method.info()["student"]
    assert 0 < info["inherited_tensors"] < info["tensors"]  # e.g. logit_scale
    fresh = siclip_step(micro_cfg, same)
    assert fresh.method.info()["student"]["inherited_tensors"] == 0
    assert not torch.equal(fresh.model.state_dict()["text_projection"], teacher["text_projection"])


def test_student_init_equals_clips_at_the_same_seed(teacher_dir, micro_cfg):
    clip = build("clip", micro_cfg, [])
    student = siclip_step(micro_cfg, teacher_dir)
    for key, value in clip.model.state_dict().items():
        assert torch.equal(student.model.state_dict()[key], value), key


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_teacher_stage_is_reused_not_retrained(tiny_data, tmp_path):
    from harness.evaluate import evaluate_run_dir

    smoke = [REPO / "configs/smoke.gin"]
    bindings = [
        f"DATA='{tiny_data}'", "METHOD='siclip'", "MODEL='micro-vit'", "TRAIN_SAMPLES=64",
        "siclip.teacher_model='micro-vit-teacher'", "siclip.teacher_batch_size=32",
        "TrainConfig.progress_bar=False", "EvalConfig.probe_train_samples=100",
    ]  # fmt: skip
    shared = tmp_path / "shared"
    first = run_config(smoke, bindings, out=tmp_path / "a", shared_root=shared)
    (teacher_dir,) = shared.iterdir()
    ckpt = checkpoint.latest(teacher_dir)
    stamp = ckpt.stat().st_mtime_ns
    teacher_eval = json.loads((teacher_dir / "eval.json").read_text())
    assert json.loads((teacher_dir / "run.json").read_text())["method"] == "clip"
    assert checkpoint.load(ckpt)["samples_seen"] == 128  # twice the student's budget

    # another student (other loss weight, shared blocks): same teacher, not retrained
    more = [*bindings, "siclip.fd_weight=100.0", "siclip.share_blocks='both'"]
    second = run_config(smoke, more, out=tmp_path / "b", shared_root=shared)
    assert list(shared.iterdir()) == [teacher_dir]
    assert ckpt.stat().st_mtime_ns == stamp
    for run in (first, second):
        record = json.loads((run / "run.json").read_text())
        assert record["method_info"]["teacher"]["location"] == str(teacher_dir.resolve())
        assert record["method_info"]["teacher"]["eval"] == teacher_eval
        costs = json.loads((run / "costs.json").read_text())
        assert costs["params_teacher"] == record["method_info"]["teacher"]["params"]
    stages = json.loads((tmp_path / "b" / "stages.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["teacher", "student"] and stages[0]["shared"]
    metrics = json.loads((second / "eval.json").read_text())
    (second / "eval.json").unlink()
    assert evaluate_run_dir(second) == pytest.approx(metrics)  # rebuilt from the run dir alone

    # moved, student and shared teacher together: the cell's directory is evaluated, its
    # student rebuilt with the teacher where it is now (its config names the old location)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("b", "shared"):
        (tmp_path / name).rename(elsewhere / name)
    assert not teacher_dir.exists()
    assert evaluate_run_dir(elsewhere / "b") == pytest.approx(metrics)
    assert json.loads((elsewhere / "b" / second.name / "eval.json").read_text()) == pytest.approx(
        metrics
    )
