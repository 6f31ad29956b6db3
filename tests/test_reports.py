"""Report tables from hand-written run directories with known numbers (checked against scipy)."""

import json

import numpy as np
import pytest
from scipy import stats as sps

from reports import build_report
from reports import report as rpt
from reports import stats as rstats
from tests.conftest import run_cli


def write_run(folder, *, method, batch, seed, metrics, status="finished", per_query=None):
    folder.mkdir(parents=True, exist_ok=True)
    run = {
        "method": method,
        "method_decisions": [f"{method} decision"],
        "model": "tiny-vit",
        "device": "cpu (test)",
        "train": {
            "batch_size": batch,
            "seed": seed,
            "budget": "samples",
            "train_samples": 1000,
            "lr_rule": "sqrt",
            "base_batch": 64,
            "lr": 1e-3,
            "warmup_samples": 100,
        },
        "data": {"name": "hand-made"},
    }
    files = {
        "run.json": run,
        "status.json": {
            "status": status,
            "step": 10,
            **({"reason": "loss became NaN"} if status != "finished" else {}),
        },
        "throughput.json": {
            "samples_per_s": 100.0 * batch**0.5,
            "step_time_ms_median": 5.0,
            "step_time_ms_p10": 4.0,
            "step_time_ms_p90": 6.5,
            "gpu_util_mean_pct": None,  # a CPU run
            "data_wait_fraction": 0.1,
            "peak_memory_mb": 900,
        },
        "costs.json": {
            "params_trainable": 1000,
            "params_total": 1200,
            "params_frozen": 200,
            "train_flops_per_sample": 2e9,
            "inference_flops_per_image": 1e6,
        },
    }
    if status == "finished":
        files["eval.json"] = metrics
    if per_query is not None:
        files["eval_ranks.json"] = per_query
    for name, payload in files.items():
        (folder / name).write_text(json.dumps(payload))


def write_sweep(root, cells, world_size=1):
    """``cells``: (method, batch, seed, metrics[, write_run options]); an option ``axes`` adds
    the cell's values on other grid axes."""
    entries = []
    for method, batch, seed, metrics, *rest in cells:
        options = dict(rest[0]) if rest else {}
        extra = options.pop("axes", {})
        suffix = "".join(f"__{k}={v}" for k, v in extra.items())
        name = f"method={method}__batch_size={batch}__seed={seed}{suffix}__h"
        write_run(
            root / "cells" / name, method=method, batch=batch, seed=seed, metrics=metrics, **options
        )
        entries.append(
            {
                "name": name,
                "values": {"METHOD": method, "BATCH_SIZE": batch, "SEED": seed, **extra},
                "dir": str(root / "cells" / name),
            }
        )
    record = {"axes": {"METHOD": ["clip", "superclip"]}, "cells": entries, "git_commit": "abc123",
              "packages": {"torch": "2.14.1"}, "world_size": world_size, "bindings": [],
              "device_peak_flops": 1e11, "device_peak_how": "measured fp32 matmul"}  # fmt: skip
    (root / "sweep.json").write_text(json.dumps(record))
    return root


CLIP = {32: [10.0, 12.0, 14.0], 64: [20.0, 22.0, 24.0]}
SUPER = {32: [13.0, 16.0, 16.0], 64: [21.0, 22.5, 25.0]}


@pytest.fixture
def seeded_sweep(tmp_path):
    cells = []
    for method, table in (("clip", CLIP), ("superclip", SUPER)):
        for batch, values in table.items():
            for seed, v in enumerate(values):
                cells.append((method, batch, seed, {"i2t_r1": v, "t2i_r1": v / 2}))
    return write_sweep(tmp_path / "sweep", cells)


def test_mean_and_t_interval_across_seeds(seeded_sweep):
    build_report(seeded_sweep)
    numbers = json.loads((seeded_sweep / "report.json").read_text())
    got = numbers["metrics"]["i2t_r1"]["clip"]["by_batch"]["32"]
    low, high = sps.t.interval(0.95, 2, loc=12.0, scale=np.std(CLIP[32], ddof=1) / np.sqrt(3))
    assert got["mean"] == pytest.approx(12.0)
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    report = (seeded_sweep / "REPORT.md").read_text()
    assert f"12.0 ± {(high - low) / 2:.1f}" in report


def test_paired_comparison_against_clip_matches_scipy(seeded_sweep):
    build_report(seeded_sweep)
    numbers = json.loads((seeded_sweep / "report.json").read_text())
    comp = numbers["comparisons"]["i2t_r1"]["superclip"]["32"]
    assert comp["diff"] == pytest.approx(np.mean(np.subtract(SUPER[32], CLIP[32])))
    assert comp["p_value"] == pytest.approx(sps.ttest_rel(SUPER[32], CLIP[32]).pvalue)
    assert comp["how"] == "paired t across seeds"


def test_batch_sensitivity_slope_matches_linregress(seeded_sweep):
    build_report(seeded_sweep)
    numbers = json.loads((seeded_sweep / "report.json").read_text())
    slope = numbers["metrics"]["i2t_r1"]["clip"]["slope"]
    x = np.log2([32] * 3 + [64] * 3)
    fit = sps.linregress(x, CLIP[32] + CLIP[64])
    half = sps.t.ppf(0.975, 4) * fit.stderr
    assert slope["slope"] == pytest.approx(10.0) and slope["slope"] == pytest.approx(fit.slope)
    assert (slope["low"], slope["high"]) == pytest.approx((fit.slope - half, fit.slope + half))


def test_report_sections_plots_and_provenance(seeded_sweep):
    path = build_report(seeded_sweep)
    report = path.read_text()
    for needle in ("git commit**: abc123", "budget rule**: samples — 1,000 samples", "learning-rate rule**: sqrt",
                   "superclip [decision]s", "## Throughput", "## Parameters and compute", "![i2t_r1](plots/i2t_r1.png)"):  # fmt: skip
        assert needle in report, needle
    png = (seeded_sweep / "plots" / "i2t_r1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((seeded_sweep / "tb_hparams").rglob("events.out.tfevents.*"))
    # MFU = flops/sample * samples/s / peak: 2e9 * 100 * sqrt(32) / 1e11
    assert f"{100 * 2e9 * 100 * 32**0.5 / 1e11:.1f}%" in report
    header = next(
        line for line in report.splitlines() if line.startswith("| method | batch | samples/s")
    )
    row = next(line for line in report.splitlines() if line.startswith("| clip | 32 |"))
    assert header.count("|") == row.count("|") and "corrupt samples" in header
    assert "| 5.0 [4.0, 6.5] |" in row and "GPU util % (NVML)" in header
    cells = [c.strip() for c in row.split("|")]
    assert cells[header.split("|").index(" GPU util % (NVML) ")] == "n/a"


def test_a_cell_not_yet_run_shows_no_numbers_in_the_cost_table(tmp_path):
    sweep = write_sweep(tmp_path / "s", [("clip", 32, 0, {"i2t_r1": 10.0, "t2i_r1": 9.0})])
    record = json.loads((sweep / "sweep.json").read_text())
    pending = sweep / "cells" / "method=superclip__batch_size=32__seed=0__h"
    pending.mkdir()  # planned, not started (or running, before its costs were counted)
    values = {"METHOD": "superclip", "BATCH_SIZE": 32, "SEED": 0}
    record["cells"].append({"name": pending.name, "values": values, "dir": str(pending)})
    (sweep / "sweep.json").write_text(json.dumps(record))
    report = build_report(sweep).read_text()
    costs = report.split("## Parameters and compute")[1].split("\n\n")[1]
    row = next(line for line in costs.splitlines() if line.startswith("| superclip |"))
    assert [c.strip() for c in row.strip("|").split("|")][2:] == ["n/a"] * 6
    assert "| clip | main | 320 | 1,000 | 1,200 | 200 | 2.000 | 1.0 |" in costs


def per_query(n_images, hits):
    """n_images images, 2 captions each; image i's queries rank 0 if hits[i] else 50."""
    ranks = [0 if h else 50 for h in hits]
    return {"i2t_rank": ranks, "t2i_rank": [r for r in ranks for _ in range(2)],
            "caption_owner": [i for i in range(n_images) for _ in range(2)]}  # fmt: skip


def test_single_seed_uses_a_bootstrap_over_test_images(tmp_path):
    rng = np.random.default_rng(1)
    clip_hits = rng.random(200) < 0.4
    super_hits = clip_hits | (rng.random(200) < 0.3)
    sweep = write_sweep(tmp_path / "s", [
        ("clip", 32, 0, {"i2t_r1": 100 * clip_hits.mean(), "t2i_r1": 100 * clip_hits.mean()}, {"per_query": per_query(200, clip_hits)}),
        ("superclip", 32, 0, {"i2t_r1": 100 * super_hits.mean(), "t2i_r1": 100 * super_hits.mean()}, {"per_query": per_query(200, super_hits)}),
    ])  # fmt: skip
    build_report(sweep)
    numbers = json.loads((sweep / "report.json").read_text())
    est = numbers["metrics"]["t2i_r1"]["clip"]["by_batch"]["32"]
    assert est["how"] == "bootstrap" and est["low"] < est["mean"] < est["high"]
    # the cluster bootstrap over 200 images is as wide as a binomial over 200 (not 400) queries
    sd = np.sqrt(clip_hits.mean() * (1 - clip_hits.mean()) / 200) * 100
    assert (est["high"] - est["low"]) == pytest.approx(2 * 1.96 * sd, rel=0.2)
    comp = numbers["comparisons"]["i2t_r1"]["superclip"]["32"]
    assert comp["diff"] == pytest.approx(100 * (super_hits.mean() - clip_hits.mean()))
    assert comp["low"] > 0 and comp["p_value"] < 0.01  # superclip only adds hits here


def labelled(prefix, tasks):
    """eval_ranks.json entries of label tasks: name -> (test-image indices, correct flags)."""
    out = {}
    for name, (images, correct) in tasks.items():
        out[f"{prefix}_{name}_image"] = [int(i) for i in images]
        out[f"{prefix}_{name}_correct"] = [int(c) for c in correct]
    return out


def test_mean_accuracy_over_tasks_resamples_the_images_the_tasks_share():
    # shape labels images 0-3, colour images 2-5: six labelled images in all
    q = rstats.Queries.from_json(
        labelled(
            "zeroshot",
            {"shape": ([0, 1, 2, 3], [1, 0, 1, 1]), "colour": ([2, 3, 4, 5], [0, 0, 1, 1])},
        )
    )
    mean = rstats.metric_from_queries("zeroshot_mean_top1")
    assert mean(q, np.arange(6)) == pytest.approx((75.0 + 50.0) / 2)
    # draw image 2 (both tasks: right, wrong) twice and image 5 (colour: right) once
    assert mean(q, np.array([2, 2, 5])) == pytest.approx((100.0 + 100 / 3) / 2)
    assert np.isnan(mean(q, np.array([0, 1])))  # no colour image drawn: the draw is left out
    est = rstats.bootstrap(q, "zeroshot_mean_top1")
    assert est.how == "bootstrap" and est.mean == pytest.approx(62.5)
    assert est.low < est.mean < est.high
    older = rstats.Queries.from_json({"zeroshot_shape_correct": [1, 0]})
    assert rstats.bootstrap(older, "zeroshot_mean_top1") is None  # no image indices: no CI


def test_single_seed_compares_zero_shot_and_probe_means_by_bootstrap(tmp_path):
    rng = np.random.default_rng(2)
    images = np.arange(300)
    base = {t: rng.random(300) < 0.5 for t in ("shape", "colour")}
    better = {t: hits | (rng.random(300) < 0.4) for t, hits in base.items()}
    cells = []
    for method, hits in (("clip", base), ("superclip", better)):
        per_q = {}
        metrics = {}
        for prefix in ("zeroshot", "linprobe"):
            per_q |= labelled(prefix, {t: (images, h) for t, h in hits.items()})
            metrics[f"{prefix}_mean_top1"] = 100 * np.mean([h.mean() for h in hits.values()])
        cells.append((method, 32, 0, metrics, {"per_query": per_q}))
    sweep = write_sweep(tmp_path / "s", cells)
    build_report(sweep)
    numbers = json.loads((sweep / "report.json").read_text())
    for metric in ("zeroshot_mean_top1", "linprobe_mean_top1"):
        est = numbers["metrics"][metric]["clip"]["by_batch"]["32"]
        assert est["how"] == "bootstrap" and est["low"] < est["mean"] < est["high"]
        comp = numbers["comparisons"][metric]["superclip"]["32"]
        assert comp["low"] > 0 and comp["p_value"] < 0.01
    text = (sweep / "REPORT.md").read_text()
    assert "#### zeroshot_mean_top1: method − clip" in text
    assert "#### linprobe_mean_top1: method − clip" in text


def test_bootstrap_p_value_counts_a_draw_of_zero_half_to_each_tail():
    assert rstats.two_sided_p(np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.5)
    assert rstats.two_sided_p(np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    assert rstats.two_sided_p(np.array([-1.0, 1.0, np.nan])) == pytest.approx(1.0)


def test_equal_differences_in_every_seed_have_no_t_test_p_value():
    comp = rstats.paired_seeds([35.1, 20.1], [35.0, 20.0])
    assert comp.diff == pytest.approx(0.1) and np.isnan(comp.p_value)
    assert rpt.fmt_comparison(comp).endswith("p=n/a")


def test_throughput_median_over_an_even_number_of_seeds_is_the_middle_mean():
    runs = [{"samples_per_s": v, "peak_memory_mb": m} for v, m in ((100, 5), (300, 7))]
    assert rpt._median_dict(runs) == {"samples_per_s": 200, "peak_memory_mb": 6}


def test_bootstrap_of_a_perfect_run_is_degenerate():
    q = rstats.Queries.from_json(per_query(30, [True] * 30))
    est = rstats.bootstrap(q, "t2i_r5")
    assert (est.mean, est.low, est.high) == (100.0, 100.0, 100.0)


def test_failed_cells_are_listed(tmp_path):
    sweep = write_sweep(tmp_path / "s", [
        ("clip", 32, 0, {"i2t_r1": 10.0}),
        ("superclip", 32, 0, {}, {"status": "diverged"}),
    ])  # fmt: skip
    report = build_report(sweep).read_text()
    assert (
        "1 of 2 cells finished." in report and "diverged" in report and "loss became NaN" in report
    )


def test_cli(tmp_path, seeded_sweep):
    assert run_cli("reports", str(seeded_sweep)).returncode == 0
    missing = run_cli("reports", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "sweep.json" in missing.stderr


def test_gap_slope_across_seeds_matches_linregress(seeded_sweep):
    build_report(seeded_sweep)
    numbers = json.loads((seeded_sweep / "report.json").read_text())
    gap = numbers["comparisons"]["i2t_r1"]["superclip"]["gap_slope"]
    diffs = np.subtract(SUPER[32], CLIP[32]).tolist() + np.subtract(SUPER[64], CLIP[64]).tolist()
    fit = sps.linregress(np.log2([32] * 3 + [64] * 3), diffs)
    assert gap["slope"] == pytest.approx(fit.slope) and gap["how"] == "t across seeds"
    half = sps.t.ppf(0.975, 4) * fit.stderr
    assert (gap["low"], gap["high"]) == pytest.approx((fit.slope - half, fit.slope + half))
    assert gap["p_value"] == pytest.approx(fit.pvalue)


def test_gap_slope_with_one_seed_sees_a_shrinking_advantage(tmp_path):
    """superclip's extra hits fall from 30% of images at b=32 to 0 at b=128: a negative slope."""
    rng = np.random.default_rng(2)
    clip_hits = rng.random(300) < 0.3
    cells = []
    for batch, extra in ((32, 0.3), (64, 0.15), (128, 0.0)):
        sup = clip_hits | (rng.random(300) < extra)
        for method, hits in (("clip", clip_hits), ("superclip", sup)):
            cells.append(
                (
                    method,
                    batch,
                    0,
                    {"i2t_r1": 100 * hits.mean()},
                    {"per_query": per_query(300, hits)},
                )
            )
    sweep = write_sweep(tmp_path / "s", cells)
    build_report(sweep)
    gap = json.loads((sweep / "report.json").read_text())["comparisons"]["i2t_r1"]["superclip"][
        "gap_slope"
    ]
    assert gap["how"] == "bootstrap over test images"
    assert gap["high"] < 0 and gap["p_value"] < 0.01 and -20 < gap["slope"] < -8
    assert "gap slope / batch doubling" in (sweep / "REPORT.md").read_text()


def test_a_stage_shared_by_cells_is_listed_once(tmp_path):
    # stages.json names a shared stage relative to each cell: ../../shared/teacher-h
    write_run(tmp_path / "shared" / "teacher-h", method="clip", batch=64, seed=0,
              metrics={"i2t_r1": 31.0, "t2i_r1": 30.0})  # fmt: skip
    cells = [("siclip", b, 0, {"i2t_r1": 10.0, "t2i_r1": 12.0}) for b in (32, 64)]
    write_sweep(tmp_path, cells)
    for method, batch, seed, metrics in cells:
        cell = tmp_path / "cells" / f"method={method}__batch_size={batch}__seed={seed}__h"
        write_run(cell / "student", method=method, batch=batch, seed=seed, metrics=metrics)
        stages = [{"name": "teacher", "run_dir": "../../shared/teacher-h", "shared": True},
                  {"name": "student", "run_dir": "student", "shared": False}]  # fmt: skip
        (cell / "stages.json").write_text(json.dumps({"stages": stages}))
    text = build_report(tmp_path).read_text()
    section = text[text.index("## Earlier stages") :]
    assert section.count("| siclip | teacher | 64 | 31.0 | 30.0 |") == 1
    assert "2 of 2 cells finished" in text


def test_a_readout_stage_at_another_batch_keeps_the_cell_at_its_own_batch(tmp_path):
    """superclass: stage 1 at the cell's batch, LiT at a fixed 64. The cell is reported at stage
    1's batch with stage 1's throughput; its retrieval numbers are LiT's."""
    cells = [("superclass", b, 0, {"i2t_r1": 5.0, "t2i_r1": 4.0}) for b in (32, 512)]
    write_sweep(tmp_path, cells)
    for method, batch, seed, metrics in cells:
        cell = tmp_path / "cells" / f"method={method}__batch_size={batch}__seed={seed}__h"
        write_run(cell / "cls", method=method, batch=batch, seed=seed, metrics={"linprobe": 70.0})
        write_run(cell / "lit", method=method, batch=64, seed=seed, metrics=metrics)
        throughput = cell / "lit" / "throughput.json"
        throughput.write_text(
            json.dumps({**json.loads(throughput.read_text()), "samples_per_s": 7.0})
        )
        stages = [{"name": "cls", "run_dir": "cls", "shared": False},
                  {"name": "lit", "run_dir": "lit", "shared": False}]  # fmt: skip
        (cell / "stages.json").write_text(json.dumps({"stages": stages}))
    text = build_report(tmp_path).read_text()
    assert "| superclass | 5.0 | 5.0 |" in text  # i2t R@1 at b=32 and b=512, no b=64 column
    assert "b=64" not in text
    throughput = text[text.index("| method | batch | samples/s") : text.index("## Parameters")]
    assert "| superclass | 512 | 2,263 |" in throughput  # stage 1's: 100 * sqrt(512)
    assert "| 7 |" not in throughput  # not the LiT stage's


def test_mfu_divides_global_throughput_by_every_device(tmp_path):
    cells = [(m, 32, 0, {"i2t_r1": 10.0}) for m in ("clip", "superclip")]
    report = build_report(write_sweep(tmp_path / "sweep", cells, world_size=4)).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| clip | 32 |"))
    assert f"| {100 * 2e9 * 100 * 32**0.5 / (4 * 1e11):.1f}% |" in row


def test_cells_of_another_axis_are_rows_of_their_own_never_pooled(tmp_path):
    """A learning-rate rule axis: each rule's method is its own row, compared with clip's run
    under the same rule; pooled, the two single runs would look like two seeds."""
    rule = "TrainConfig.lr_rule"
    score = {("clip", "none"): 10.0, ("clip", "sqrt"): 20.0,
             ("superclip", "none"): 13.0, ("superclip", "sqrt"): 19.0}  # fmt: skip
    cells = [
        (
            m,
            32,
            0,
            {"i2t_r1": v},
            {"axes": {rule: r}, "per_query": per_query(100, [i < v for i in range(100)])},
        )
        for (m, r), v in score.items()
    ]
    sweep = write_sweep(tmp_path / "sweep", cells)
    report = build_report(sweep).read_text()
    numbers = json.loads((sweep / "report.json").read_text())
    rows = {m for m in numbers["metrics"]["i2t_r1"]}
    assert rows == {f"{m} ({rule}={r!r})" for m, r in score}
    for (m, r), v in score.items():
        assert numbers["metrics"]["i2t_r1"][f"{m} ({rule}={r!r})"]["by_batch"]["32"]["mean"] == v
    diffs = {k: c["32"]["diff"] for k, c in numbers["comparisons"]["i2t_r1"].items()}
    assert diffs == pytest.approx(
        {f"superclip ({rule}='none')": 3.0, f"superclip ({rule}='sqrt')": -1.0}, abs=1e-9
    )
    assert f"| clip ({rule}='sqrt') | 32 |" in report

    # an axis spelt as the gin parameter a table axis binds is that table axis, not a variant
    from reports.load import variant_of

    assert variant_of({"TrainConfig.seed": 1, "TrainConfig.batch_size": 32, rule: "none"}) == (
        f"{rule}='none'"
    )


# ---------------------------------------------------------------- honest cost and context


def test_chance_levels_contention_and_the_run_mean_are_said(tmp_path):
    chance = {"chance_i2t_r1": 0.1, "chance_mean_r1": 0.1}
    loads = {
        "clip": {"cpu_share_others": 0.02, "contended": False},
        "superclip": {"cpu_share_others": 0.61, "contended": True},
    }
    duplicates = {"clip": 0, "superclip": 3}  # two ranks' readers at an epoch boundary
    cells = []
    for method in ("clip", "superclip"):
        cells.append((method, 32, 0, {"i2t_r1": 5.0, "mean_r1": 4.0, **chance}))
    sweep = write_sweep(tmp_path / "sweep", cells)
    for method, load in loads.items():  # add what the trainer records of the machine's load
        path = sweep / "cells" / f"method={method}__batch_size=32__seed=0__h" / "throughput.json"
        recorded = {"host_load": load, "duplicate_images": duplicates[method]}
        path.write_text(json.dumps({**json.loads(path.read_text()), **recorded}))
    report = build_report(sweep).read_text()
    assert "### image→text R@1 (%); chance 0.1%" in report
    assert "### mean R@1 (%); chance 0.1%" in report
    assert "samples/s (run mean)" in report and "not batch ÷ median step" in report
    throughput = report.split("## Throughput")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0]: line for line in throughput.splitlines() if line.startswith("| ")}
    assert "| 2% |" in rows["| clip"] and "⚠" not in rows["| clip"]
    assert "| 61% ⚠ |" in rows["| superclip"]
    assert "| duplicate images |" in throughput and rows["| superclip"].endswith("| 0 | 3 |")
    assert "A smoke check" not in report


def test_a_smoke_check_sweep_says_so_before_any_number(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", [("clip", 32, 0, {"i2t_r1": 1.0})])
    record = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**record, "smoke_check": True}))
    report = build_report(sweep).read_text()
    assert report.index("**A smoke check, not a result.**") < report.index("git commit")


def test_a_stale_running_cell_is_named_in_the_report(tmp_path):
    import fcntl

    sweep = write_sweep(
        tmp_path / "sweep",
        [
            ("clip", 32, 0, {}, {"status": "running"}),
            ("superclip", 32, 0, {}, {"status": "running"}),
        ],
    )
    dead, live = (
        sweep / "cells" / f"method={m}__batch_size=32__seed=0__h" for m in ("clip", "superclip")
    )
    for cell in (dead, live):
        status = json.loads((cell / "status.json").read_text())
        (cell / "status.json").write_text(json.dumps({**status, "pid": 4242, "host": "node7"}))
    (dead / ".lock").write_text("{}")  # its holder died: nobody holds the flock
    with open(live / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live trainer
        report = build_report(sweep).read_text()
    rows = {
        line.split(" | ")[0]: line for line in report.splitlines() if line.startswith("| method=")
    }
    assert "running? (stale: pid 4242 on node7 is gone)" in rows[f"| {dead.name}"]
    assert f"| {live.name} | running |" in report
