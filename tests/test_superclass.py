"""superclass's two stages and superclip: vision-only stage 1, LiT freezing, IDF across ranks
and across a resume, and the whole pipeline (both stage directories, each evaluated)."""

import json

import pytest
import torch
from torch import nn

from harness import checkpoint, models
from harness.costs import parameter_counts
from harness.data.loader import prepare_batch
from harness.distributed import DistInfo
from harness.errors import ConfigError
from harness.planner import plan_run
from harness.run import run_config
from harness.rundir import RunDir
from harness.specs import DataConfig, TrainConfig
from harness.trainer import Trainer
from methods import RunInfo, build_method, method_class
from methods.superclass import LIT_TRAINABLE, locked_image_embedding
from methods.token_classification import VOCAB_SIZE
from tests.conftest import REPO
from tests.dist_utils import build, make_batch, one_step, run_distributed

SMOKE = [REPO / "configs/smoke.gin"]
FAST = ["MODEL='micro-vit'", "TrainConfig.progress_bar=False", "EvalConfig.probe_train_samples=100"]


def head_params(width: int) -> int:
    return 2 * width + (width + 1) * VOCAB_SIZE  # LayerNorm + Linear(width -> V, bias)


def lit_bindings(stage1_dir) -> list[str]:
    return ["superclass.phase = 'lit'", f"superclass.init_from = '{stage1_dir}'"]


@pytest.fixture
def stage1_dir(micro_cfg, tmp_path):
    """A stage-1 run directory holding only what LiT reads: checkpoints/latest.pt's model."""
    step = build("superclass", micro_cfg, [], seed=123)
    one_step(step, make_batch(4, 32, 36))  # weights no fresh model would have
    checkpoint.save(checkpoint.latest(tmp_path / "cls"), {"model": step.model.state_dict()})
    return tmp_path / "cls"


def test_stage1_builds_and_runs_no_text_tower(micro_cfg, monkeypatch):
    step = build("superclass", micro_cfg, [])
    names = [n for n, _ in step.model.named_parameters()]
    assert names and all(n.startswith("visual.") for n in names)
    assert not hasattr(step.model, "encode_text") and not hasattr(step.model, "token_embedding")
    assert not step.method.has_text_tower(step.model)
    width = micro_cfg["vision_cfg"]["width"]
    counts = parameter_counts(step.model, step.method)
    assert counts["params_method_extra"] == head_params(width)

    def text_tower_ran(*args, **kwargs):
        raise AssertionError("stage 1 ran a text tower")

    monkeypatch.setattr(models, "encode_text", text_tower_ran)
    monkeypatch.setattr(nn.Embedding, "forward", text_tower_ran)  # any token embedding
    _, terms, _ = one_step(step, make_batch(8, 32, 36))
    assert set(terms) == {"loss", "cls_loss"}  # the sum, and each term
    image = prepare_batch(make_batch(2, 32, 36), torch.device("cpu"))["image"]
    features = step.method.probe_features(step.model, image)
    assert features.shape == (2, width)
    torch.testing.assert_close(
        step.method.embed_images(step.model, image), models.normalize(features)
    )


def test_stages_bind_stage1_into_lit_with_a_fraction_of_the_budget():
    stages = build_method("superclass").stages(
        RunInfo(batch_size=32, train_samples=1000, model="m")
    )
    assert [s.name for s in stages] == ["cls", "lit"]
    assert dict(stages[1].inputs) == {"superclass.init_from": "cls"}
    assert "TRAIN_SAMPLES = 500" in stages[1].bindings
    assert "superclass.phase = 'lit'" in stages[1].bindings
    planned = plan_run(
        SMOKE, ["METHOD='superclass'", "superclass.lit_samples_fraction=0.25"]
    ).stages
    assert planned[1].spec.train.train_samples == 160  # smoke.gin: TRAIN_SAMPLES = 640


def test_the_lit_stage_runs_at_lit_batch_size_or_the_runs_batch():
    run = RunInfo(batch_size=512, train_samples=1000, model="m")
    fixed = method_class("superclass")(lit_batch_size=64).stages(run)
    assert "TrainConfig.batch_size = 64" in fixed[1].bindings
    assert not any("batch_size" in b for b in fixed[0].bindings)  # stage 1: the cell's batch
    default = method_class("superclass")(lit_batch_size=None).stages(run)
    assert not any("batch_size" in b for b in default[1].bindings)
    planned = plan_run(SMOKE, ["METHOD='superclass'"]).stages  # configs/methods/superclass.gin: 64
    assert planned[1].spec.train.batch_size == 64
    for bad in (0, 2.5):
        with pytest.raises(ConfigError, match="lit_batch_size"):
            method_class("superclass")(lit_batch_size=bad)


def test_lit_needs_the_stage1_run_dir(micro_cfg):
    with pytest.raises(ConfigError, match="init_from"):
        build("superclass", micro_cfg, ["superclass.phase = 'lit'"])
    with pytest.raises(ConfigError, match="choose one of"):
        build("superclass", micro_cfg, ["superclass.phase = 'lot'"])


def test_lit_freezes_the_stage1_tower_except_final_norm_and_new_projection(micro_cfg, stage1_dir):
    trained = checkpoint.load(checkpoint.latest(stage1_dir))["model"]
    step = build("superclass", micro_cfg, lit_bindings(stage1_dir))
    visual = step.model.visual
    for name, value in visual.state_dict().items():
        if name != "proj":
            assert torch.equal(value, trained[f"visual.{name}"]), name
    assert visual.proj.shape == (micro_cfg["vision_cfg"]["width"], micro_cfg["embed_dim"])
    trainable = {n for n, p in visual.named_parameters() if p.requires_grad}
    assert trainable == LIT_TRAINABLE
    assert all(p.requires_grad for n, p in step.model.named_parameters() if "visual." not in n)

    _, terms, grads = one_step(step, make_batch(8, 32, 36))
    assert set(terms) == {"loss", "contrastive_loss", "logit_scale"}
    assert {n for n in grads if n.startswith("model.visual.")} == {
        f"model.visual.{n}" for n in LIT_TRAINABLE
    }
    # the no-grad trunk path gives open_clip's own forward (mean-pooled tokens, new projection)
    image = prepare_batch(make_batch(3, 32, 36), torch.device("cpu"))["image"]
    with torch.no_grad():
        torch.testing.assert_close(locked_image_embedding(visual, image), visual(image)[0])
        torch.testing.assert_close(
            step.method.probe_features(step.model, image), visual(image)[1].mean(1)
        )


def test_lit_rejects_a_checkpoint_that_is_not_a_stage1_tower(micro_cfg, tmp_path):
    clip = build("clip", micro_cfg, [])
    checkpoint.save(checkpoint.latest(tmp_path / "clip"), {"model": clip.model.state_dict()})
    with pytest.raises(checkpoint.CheckpointError, match="not a superclass stage-1"):
        build("superclass", micro_cfg, lit_bindings(tmp_path / "clip"))


@pytest.mark.dist
def test_two_gloo_processes_give_the_single_process_idf_state(micro_cfg, tmp_path):
    batch = make_batch(8, 32, 36)
    single = build("superclass", micro_cfg, [])
    single_loss, _, _ = one_step(single, batch, steps=2)
    ranks = run_distributed("superclass", micro_cfg, [], batch, world=2, out=tmp_path, steps=2)
    expected = single.method.state_dict()
    for result in ranks:
        assert result["loss"].item() == pytest.approx(single_loss.item(), abs=1e-5)
        for key in ("classifier.idf.df", "classifier.idf.steps"):
            torch.testing.assert_close(result["state"][key], expected[key], rtol=0, atol=1e-15)
    assert expected["classifier.idf.steps"].item() == 2


def make_trainer(name, micro_cfg, run_dir, manifest):
    step = build(name, micro_cfg, [])
    return Trainer(
        method=step.method, model=step.model, config=TrainConfig(batch_size=8, progress_bar=False),
        data_config=DataConfig(), manifest=manifest, run=RunDir(run_dir),
        dist=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
        image_size=32, context_length=36,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["superclip", "superclass"])
def test_resume_restores_the_idf_buffers(name, micro_cfg, tmp_path):
    trainer = make_trainer(name, micro_cfg, tmp_path, manifest=None)
    for seed in range(2):
        trainer.step(prepare_batch(make_batch(8, 32, 36, seed), torch.device("cpu")))
        trainer.state.step += 1
    trainer.save_checkpoint()
    saved = {k: v.clone() for k, v in trainer.method.classifier.idf.state_dict().items()}
    assert saved["steps"].item() == 2 and saved["df"].dtype == torch.float64

    fresh = make_trainer(name, micro_cfg, tmp_path, manifest=None)
    assert fresh.method.classifier.idf.steps.item() == 0
    fresh.resume()
    for key, value in fresh.method.classifier.idf.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.slow
def test_superclass_pipeline_runs_both_stages(tiny_data, tmp_path):
    out = tmp_path / "superclass"
    bindings = [f"DATA='{tiny_data}'", "METHOD='superclass'", "TRAIN_SAMPLES=64", *FAST]
    final = run_config(SMOKE, bindings, out=out)
    assert final == out / "lit"
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [(s["name"], s["run_dir"]) for s in stages] == [("cls", "cls"), ("lit", "lit")]
    cls_eval = json.loads((out / "cls" / "eval.json").read_text())
    lit_eval = json.loads((out / "lit" / "eval.json").read_text())
    assert "linprobe_mean_top1" in cls_eval and "i2t_r1" not in cls_eval
    assert "zeroshot_mean_top1" not in cls_eval
    assert {"i2t_r1", "t2i_r1", "zeroshot_mean_top1", "linprobe_mean_top1"} <= set(lit_eval)

    def read(stage, name):
        return json.loads((out / stage / name).read_text())

    assert read("lit", "run.json")["train"]["train_samples"] == 32  # 0.5 x 64
    assert read("cls", "costs.json")["params_method_extra"] == head_params(32)
    assert read("cls", "costs.json")["inference_flops_per_caption"] == 0
    assert read("lit", "costs.json")["params_frozen"] > 0
    cls_model = checkpoint.load(checkpoint.latest(out / "cls"))["model"]
    lit_model = checkpoint.load(checkpoint.latest(out / "lit"))["model"]
    for key, value in cls_model.items():  # the frozen trunk came through LiT unchanged
        if key.removeprefix("visual.") not in LIT_TRAINABLE:
            assert torch.equal(lit_model[key], value), key
