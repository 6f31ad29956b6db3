"""The real entry points: a smoke run, the standalone evaluator, and resuming after SIGINT."""

import json
import os
import signal

import pytest
import torch

from harness import checkpoint
from harness.pipeline import run_pipeline
from harness.trainer import Trainer
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
    ranks = json.loads((out / "eval_ranks.json").read_text())
    assert len(ranks["i2t_rank"]) == 60 and len(ranks["t2i_rank"]) == 180

    (out / "eval.json").unlink()
    again = run_cli("harness.evaluate", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text()) == pytest.approx(trained)


def saved_state(run_dir):
    state = checkpoint.load(checkpoint.latest(run_dir))
    return {**state["model"], **{f"method.{k}": v for k, v in state["method"].items()}}


# Per method, bindings that exercise its own state across the interruption (at step 7 of 20).
RESUME_CASES = {
    "clip": [],
    # m = 64 fills after 2 batches of 32; T_r = 3: restarts at 0, 1 (queue full), 3, 6, 9, ... 18
    "neuclip": ["neuclip.num_prototypes=64", "neuclip.restart_every=3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RESUME_CASES))
def test_resume_after_sigint_matches_an_uninterrupted_run(method, tiny_data, tmp_path, monkeypatch):
    """Final weights and method state (buffers: IDF, prototypes, queues...) equal an
    uninterrupted run's."""
    bindings = [
        f"DATA='{tiny_data}'",
        *FAST,
        "TRAIN_SAMPLES=640",
        "TrainConfig.checkpoint_every_samples=0",
        f"METHOD='{method}'",
        *RESUME_CASES[method],
    ]
    smoke = [REPO / "configs/smoke.gin"]
    run_pipeline(smoke, bindings, out=tmp_path / "straight")

    original = Trainer._one_step

    def interrupt_at_step_7(self, batch):
        terms = original(self, batch)
        if self.state.step == 6:  # becomes step 7 after this call: SIGINT lands mid-interval
            os.kill(os.getpid(), signal.SIGINT)
        return terms

    monkeypatch.setattr(Trainer, "_one_step", interrupt_at_step_7)
    with pytest.raises(SystemExit) as stopped:
        run_pipeline(smoke, bindings, out=tmp_path / "resumed")
    assert stopped.value.code == 130
    status = json.loads((tmp_path / "resumed" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 10  # next log step
    monkeypatch.setattr(Trainer, "_one_step", original)

    with pytest.raises(Exception, match="--resume"):
        run_pipeline(smoke, bindings, out=tmp_path / "resumed")
    run_pipeline(smoke, bindings, out=tmp_path / "resumed", resume=True)

    a, b = saved_state(tmp_path / "straight"), saved_state(tmp_path / "resumed")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    lines = [
        json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
