"""The real entry points: a smoke run, the standalone evaluator, and resuming after SIGINT."""

import json
import os
import signal

import numpy as np
import pytest
import torch

import methods
from harness import checkpoint
from harness.errors import ConfigError
from harness.planner import plan_run
from harness.run import run_config
from harness.trainer import Trainer
from reports import stats as rstats
from tests.conftest import REPO, run_cli

FAST = ["MODEL='micro-vit'", "TrainConfig.progress_bar=False", "EvalConfig.probe_train_samples=100"]


@pytest.mark.slow
def test_smoke_run_then_standalone_evaluator(tiny_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "harness.run", "configs/smoke.gin", "--out", str(out), "--gin_param", f"DATA='{tiny_data}'"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("operative_config.gin", "run.json", "metrics.jsonl", "eval.json", "eval_ranks.json",
                 "costs.json", "throughput.json", "checkpoints/latest.pt"):  # fmt: skip
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    trained = json.loads((out / "eval.json").read_text())
    assert {"i2t_r1", "t2i_r10", "zeroshot_mean_top1", "linprobe_mean_top1"} <= set(trained)
    speed = json.loads((out / "throughput.json").read_text())
    p10, median, p90 = (speed[f"step_time_ms_{q}"] for q in ("p10", "median", "p90"))
    assert 0 < p10 <= median <= p90 and speed["samples_per_s"] > 0
    assert speed["gpu_util_mean_pct"] is None and speed["gpu_nvml"] == "no GPU (CPU run)"
    ranks = json.loads((out / "eval_ranks.json").read_text())
    assert len(ranks["i2t_rank"]) == 60 and len(ranks["t2i_rank"]) == 180
    # each label task's correctness comes with its test images: the report resamples those
    for prefix in ("zeroshot", "linprobe"):
        tasks = [k[: -len("_correct")] for k in ranks if k.startswith(prefix) and "_correct" in k]
        assert tasks and all(len(ranks[f"{t}_image"]) == len(ranks[f"{t}_correct"]) for t in tasks)
        every_image = np.arange(len({i for t in tasks for i in ranks[f"{t}_image"]}))
        mean = rstats.metric_from_queries(f"{prefix}_mean_top1")
        assert mean(rstats.Queries.from_json(ranks), every_image) == pytest.approx(
            trained[f"{prefix}_mean_top1"]
        )

    (out / "eval.json").unlink()
    again = run_cli("harness.evaluate", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text()) == pytest.approx(trained)


@pytest.mark.slow
def test_resume_after_corrupt_samples_matches_an_uninterrupted_run(
    tiny_data, tmp_path, monkeypatch
):
    """The resumed loader starts where each reader stopped, corrupt samples included: a batch
    count alone would serve again as many samples as were skipped as corrupt."""
    from tests.test_faults import copy_with_broken_pngs

    copy_with_broken_pngs(tiny_data, tmp_path / "data", "train")
    bindings = [
        f"DATA='{tmp_path / 'data'}'", *FAST, "TRAIN_SAMPLES=960", "METHOD='clip'",
        "TrainConfig.checkpoint_every_samples=0", "TrainConfig.deterministic=True",
    ]  # fmt: skip
    smoke = [REPO / "configs/smoke.gin"]
    straight = run_config(smoke, bindings, out=tmp_path / "straight")
    original = Trainer.step

    def interrupt_at_step_17(self, batch):  # stops at that step boundary
        terms = original(self, batch)
        if self.state.step == 16:
            os.kill(os.getpid(), signal.SIGINT)
        return terms

    monkeypatch.setattr(Trainer, "step", interrupt_at_step_17)
    with pytest.raises(SystemExit):
        run_config(smoke, bindings, out=tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "step", original)
    saved = checkpoint.load(checkpoint.latest(tmp_path / "resumed"))
    assert saved["step"] == 17 and saved["corrupt_samples"] > 0  # the skip must cover some
    resumed = run_config(smoke, bindings, out=tmp_path / "resumed", resume=True)
    a, b = saved_state(straight), saved_state(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_model_that_gives_nan_is_a_diverged_run_not_a_crash_or_a_perfect_score(
    tiny_data, tmp_path
):
    # one step at a huge learning rate: its loss is finite (the trainer's check passes), its
    # update leaves a model whose embeddings are NaN, which would rank every query first
    out = tmp_path / "run"
    done = run_cli(
        "harness.run", "configs/smoke.gin", "--out", str(out), "--gin_param", f"DATA='{tiny_data}'",
        *(f"--gin_param={b}" for b in [*FAST, "TRAIN_SAMPLES=32", "TrainConfig.lr=1e9"]),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]  # EXIT_DIVERGED
    said = "60 of 60 test image embeddings are NaN or inf"
    assert f"{out} diverged: evaluation: {said}" in done.stderr
    assert "Traceback" not in done.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged" and said in status["reason"] and status["step"] == 1
    assert not (out / "eval.json").exists()

    again = run_cli("harness.evaluate", str(out))
    assert again.returncode == 2 and f"error: {out}: {said}" in again.stderr, again.stderr


def saved_state(run_dir):
    state = checkpoint.load(checkpoint.latest(run_dir))
    return {**state["model"], **{f"method.{k}": v for k, v in state["method"].items()}}


# Per method, bindings that exercise its own state across the interruption (at step 7 of 20).
RESUME_CASES = {
    # m = 64 fills after 2 batches of 32; T_r = 3: restarts at 0, 1 (queue full), 3, 6, 9, ... 18
    "neuclip": ["neuclip.num_prototypes=64", "neuclip.restart_every=3"],
    # a micro teacher, trained once in the shared folder; the interruption lands in the student
    "siclip": ["siclip.teacher_model='micro-vit-teacher'", "siclip.teacher_batch_size=32"],
}


# A binding that changes the run's own config (not a shared stage's) for the refusal checks.
OTHER_CONFIG = {"siclip": "siclip.seed=5"}


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.registered_names())
def test_resume_after_sigint_matches_an_uninterrupted_run(method, tiny_data, tmp_path, monkeypatch):
    """Deterministic mode: final weights and method state (IDF, prototypes, queues...) equal an
    uninterrupted run's to 1e-6 (float32 round-off; in practice they are bitwise equal on CPU),
    and so do the final metrics. Multi-stage methods are interrupted in their first own stage."""
    bindings = [
        f"DATA='{tiny_data}'",
        *FAST,
        "TRAIN_SAMPLES=640",
        "TrainConfig.checkpoint_every_samples=0",
        "TrainConfig.deterministic=True",
        f"METHOD='{method}'",
        *RESUME_CASES.get(method, []),
    ]
    smoke = [REPO / "configs/smoke.gin"]
    straight = run_config(smoke, bindings, out=tmp_path / "straight")

    original = Trainer.step

    def interrupt_at_step_7(self, batch):
        terms = original(self, batch)
        if self.state.step == 6:  # becomes step 7 after this call: SIGINT lands mid-interval
            os.kill(os.getpid(), signal.SIGINT)
        return terms

    monkeypatch.setattr(Trainer, "step", interrupt_at_step_7)
    with pytest.raises(SystemExit) as stopped:
        run_config(smoke, bindings, out=tmp_path / "resumed")
    assert stopped.value.code == 130
    interrupted = next(p for p in [tmp_path / "resumed", *(tmp_path / "resumed").glob("*")]
                       if (p / "status.json").exists() and "interrupted" in (p / "status.json").read_text())  # fmt: skip
    status = json.loads((interrupted / "status.json").read_text())
    assert status["step"] == 7  # the step boundary right after the signal
    monkeypatch.setattr(Trainer, "step", original)

    with pytest.raises(Exception, match="--resume"):
        run_config(smoke, bindings, out=tmp_path / "resumed")
    other = OTHER_CONFIG.get(
        method, "TrainConfig.lr=0.0123"
    )  # siclip's lr would retrain the teacher
    with pytest.raises(
        ConfigError, match=f"(?s)holds a run of another config.*{other.split('=')[0]}"
    ):
        run_config(smoke, [*bindings, other], out=tmp_path / "resumed", resume=True)
    resumed = run_config(smoke, bindings, out=tmp_path / "resumed", resume=True)
    with pytest.raises(ConfigError, match="holds a run of another config"):  # finished, too
        run_config(smoke, [*bindings, other], out=tmp_path / "resumed")
    assert run_config(smoke, bindings, out=tmp_path / "resumed") == resumed  # same: reported

    a, b = saved_state(straight), saved_state(resumed)
    assert set(a) == set(b)
    for key in a:
        if torch.is_tensor(a[key]):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
        else:
            assert b[key] == a[key], key
    lines = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    # every step once: log steps, the interrupted one's partial interval, then on after resume
    assert [x["step"] for x in lines] == [5, 7, 10, 15, 20]
    metrics_a = json.loads((straight / "eval.json").read_text())
    assert json.loads((resumed / "eval.json").read_text()) == pytest.approx(metrics_a, abs=1e-6)


def test_a_direct_binding_that_would_override_a_stage_macro_is_refused(tiny_data, tmp_path):
    """superclass's LiT stage sets TRAIN_SAMPLES to half the budget; a binding of the field
    itself would win over it without a word, so planning refuses it and names the macro."""
    smoke = [REPO / "configs/smoke.gin"]
    base = [f"DATA='{tiny_data}'", "METHOD='superclass'"]
    stages = plan_run(smoke, [*base, "TRAIN_SAMPLES=320"], out=tmp_path / "run").stages
    assert [s.name for s in stages] == ["cls", "lit"] and stages[1].spec.train.train_samples == 160
    with pytest.raises(
        ConfigError, match=r"stage 'lit' sets TRAIN_SAMPLES = 160.*bind TRAIN_SAMPLES"
    ):
        plan_run(smoke, [*base, "TrainConfig.train_samples=320"], out=tmp_path / "run")
