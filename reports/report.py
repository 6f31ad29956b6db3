"""REPORT.md for a sweep: one method x batch-size table per metric, paired comparisons against
clip, batch sensitivity, throughput and cost columns, and a provenance header."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from reports import stats
from reports.load import CellResult, Sweep, load_sweep, lock_is_held

METRICS = [
    ("i2t_r1", "image→text R@1 (%)"),
    ("t2i_r1", "text→image R@1 (%)"),
    ("mean_r1", "mean R@1 (%)"),
    ("i2t_r5", "image→text R@5 (%)"),
    ("t2i_r5", "text→image R@5 (%)"),
    ("i2t_r10", "image→text R@10 (%)"),
    ("t2i_r10", "text→image R@10 (%)"),
    ("zeroshot_mean_top1", "zero-shot accuracy, mean over label tasks (%)"),
    ("linprobe_mean_top1", "linear probe accuracy, mean over label tasks (%)"),
]
COMPARED = ("i2t_r1", "t2i_r1", "mean_r1", "zeroshot_mean_top1", "linprobe_mean_top1")
BASELINE = "clip"
REPORT_NAME = "REPORT.md"


# ---------------------------------------------------------------- numbers


def estimate(cells: list[CellResult], metric: str) -> stats.Estimate | None:
    """Across seeds when there are several; else a bootstrap over the one run's test images."""
    values = [c.final.metrics[metric] for c in cells if c.finished and metric in c.final.metrics]
    if not values:
        return None
    if len(values) >= 2:
        return stats.t_interval(values)
    one = next(c for c in cells if c.finished and metric in c.final.metrics)
    boot = (
        stats.bootstrap(stats.Queries.from_json(one.per_query), metric) if one.per_query else None
    )
    return boot or stats.t_interval(values)


def compare(
    cells: list[CellResult], base: list[CellResult], metric: str
) -> stats.Comparison | None:
    """Method minus clip at the same batch, paired by seed."""
    by_seed = {c.seed: c for c in base if c.finished and metric in c.final.metrics}
    pairs = [
        (c, by_seed[c.seed])
        for c in cells
        if c.finished and metric in c.final.metrics and c.seed in by_seed
    ]
    if not pairs:
        return None
    if len(pairs) >= 2:
        return stats.paired_seeds(
            [a.final.metrics[metric] for a, _ in pairs], [b.final.metrics[metric] for _, b in pairs]
        )
    a, b = pairs[0]
    if not (a.per_query and b.per_query):
        return None
    return stats.paired_bootstrap(
        stats.Queries.from_json(a.per_query), stats.Queries.from_json(b.per_query), metric
    )


def slope(cells: list[CellResult], metric: str) -> stats.Slope | None:
    points = [
        (c.batch, c.final.metrics[metric])
        for c in cells
        if c.finished and metric in c.final.metrics
    ]
    if not points:
        return None
    return stats.batch_slope([b for b, _ in points], [v for _, v in points])


def grouped(sweep: Sweep) -> dict[tuple[str, int], list[CellResult]]:
    """Cells by (report row, batch): only seeds are pooled, never other axes' values."""
    groups: dict[tuple[str, int], list[CellResult]] = defaultdict(list)
    for cell in sweep.cells:
        groups[(cell.row, cell.batch)].append(cell)
    return groups


# ---------------------------------------------------------------- formatting


def fmt_estimate(e: stats.Estimate | None) -> str:
    if e is None:
        return "—"
    if e.how == "t":
        return f"{e.mean:.1f} ± {e.half_width:.1f}"
    if e.how == "bootstrap":
        return f"{e.mean:.1f} [{e.low:.1f}, {e.high:.1f}]"
    return f"{e.mean:.1f}"


def fmt_comparison(c: stats.Comparison | None) -> str:
    if c is None:
        return "—"
    if math.isnan(c.p_value):
        p = "p=n/a"
    else:
        p = "p<0.001" if c.p_value < 0.001 else f"p={c.p_value:.3f}"
    return f"{c.diff:+.1f} [{c.low:+.1f}, {c.high:+.1f}] {p}"


def fmt_slope(s: stats.Slope | None) -> str:
    if s is None:
        return "—"
    if math.isnan(s.low):
        return f"{s.slope:+.2f}"
    return f"{s.slope:+.2f} [{s.low:+.2f}, {s.high:+.2f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


# ---------------------------------------------------------------- sections


def metric_section(sweep: Sweep, metric: str, title: str, groups) -> tuple[str, dict]:
    header = ["method", *[f"b={b}" for b in sweep.batches], "slope / batch doubling"]
    rows, numbers = [], {}
    for method in sweep.rows:
        cells = [c for c in sweep.cells if c.row == method]
        ests = [estimate(groups.get((method, b), []), metric) for b in sweep.batches]
        s = slope(cells, metric)
        rows.append([method, *[fmt_estimate(e) for e in ests], fmt_slope(s)])
        numbers[method] = {
            "by_batch": {
                b: (e.__dict__ if e else None) for b, e in zip(sweep.batches, ests, strict=True)
            },
            "slope": s.__dict__ if s else None,
        }
    if all(all(cell == "—" for cell in row[1:-1]) for row in rows):
        return "", {}
    chance = chance_level(sweep, metric)
    heading = title + (f"; chance {chance:.2g}%" if chance is not None else "")
    text = f"### {heading}\n\n{table(header, rows)}\n\n![{metric}](plots/{metric}.png)\n"
    return text, numbers


def chance_level(sweep: Sweep, metric: str) -> float | None:
    """What a random ranking or a uniform guess scores on ``metric`` (the evaluator's
    ``chance_<metric>``), from the first cell that has it."""
    return next(
        (c.final.metrics[f"chance_{metric}"] for c in sweep.cells
         if f"chance_{metric}" in c.final.metrics),
        None,
    )  # fmt: skip


def gap_slope(sweep: Sweep, groups, method: str, metric: str) -> stats.GapSlope | None:
    """Does the method's advantage over clip change with the batch? Slope of the paired gap
    against log2(batch): across seeds when there are several, else a bootstrap over images."""
    baseline = sweep.baseline_row(method, BASELINE)
    if len(sweep.seeds) >= 2:
        xs, ms, bs = [], [], []
        for b in sweep.batches:
            base = {
                c.seed: c
                for c in groups.get((baseline, b), [])
                if c.finished and metric in c.final.metrics
            }
            for c in groups.get((method, b), []):
                if c.finished and metric in c.final.metrics and c.seed in base:
                    xs.append(b)
                    ms.append(c.final.metrics[metric])
                    bs.append(base[c.seed].final.metrics[metric])
        return stats.gap_slope_seeds(xs, ms, bs)
    pairs = {}
    for b in sweep.batches:
        mine = [c for c in groups.get((method, b), []) if c.finished and c.per_query]
        base = [c for c in groups.get((baseline, b), []) if c.finished and c.per_query]
        if mine and base:
            pairs[b] = (
                stats.Queries.from_json(mine[0].per_query),
                stats.Queries.from_json(base[0].per_query),
            )
    return stats.gap_slope_bootstrap(pairs, metric)


def fmt_gap_slope(g: stats.GapSlope | None) -> str:
    if g is None:
        return "—"
    p = (
        ""
        if math.isnan(g.p_value)
        else (" p<0.001" if g.p_value < 0.001 else f" p={g.p_value:.3f}")
    )
    return f"{g.slope:+.2f} [{g.low:+.2f}, {g.high:+.2f}]{p}"


def comparison_section(sweep: Sweep, groups) -> tuple[str, dict]:
    parts, numbers = [], {}
    for metric in COMPARED:
        header = ["method", *[f"b={b}" for b in sweep.batches], "gap slope / batch doubling"]
        rows = []
        for method in sweep.rows:
            baseline = sweep.baseline_row(method, BASELINE)
            if method == baseline:
                continue
            comps = [
                compare(groups.get((method, b), []), groups.get((baseline, b), []), metric)
                for b in sweep.batches
            ]
            trend = gap_slope(sweep, groups, method, metric)
            rows.append([method, *[fmt_comparison(c) for c in comps], fmt_gap_slope(trend)])
            numbers.setdefault(metric, {})[method] = {
                b: (c.__dict__ if c else None) for b, c in zip(sweep.batches, comps, strict=True)
            }
            numbers[metric][method]["gap_slope"] = trend.__dict__ if trend else None
        if any(any(x != "—" for x in r[1:]) for r in rows):
            parts.append(f"#### {metric}: method − {BASELINE}\n\n{table(header, rows)}\n")
    return "\n".join(parts), numbers


def throughput_section(sweep: Sweep, groups, peak: float | None) -> str:
    header = [
        "method",
        "batch",
        "samples/s (run mean)",
        "step ms median [p10, p90]",
        "data wait",
        "peak mem (MB)",
        "GPU util % (NVML)",
        "train GFLOP/sample",
        "MFU",
        "others' CPU",
        "corrupt samples",
        "duplicate images",  # in one global batch: two ranks' readers at an epoch boundary
    ]
    rows = []
    world = int(sweep.record.get("world_size", 1))  # samples/s are global, the peak per device
    for method in sweep.rows:
        for b in sweep.batches:
            cells = [c for c in groups.get((method, b), []) if c.main.throughput]
            if not cells:
                continue
            t = _median_dict([c.main.throughput for c in cells])
            flops = cells[0].main.costs.get("train_flops_per_sample")
            achieved = flops * t["samples_per_s"] if flops and t.get("samples_per_s") else None
            mfu = f"{100 * achieved / (peak * world):.1f}%" if achieved and peak else "n/a"
            rows.append([
                method, str(b), _num(t.get("samples_per_s"), 0), _step_ms(t),
                f"{100 * t.get('data_wait_fraction', float('nan')):.0f}%", _num(t.get("peak_memory_mb"), 0),
                _num(t.get("gpu_util_mean_pct"), 0),
                _num(flops / 1e9 if flops else None, 3), mfu, _contention(cells),
                str(int(t.get("corrupt_samples", 0))), str(int(t.get("duplicate_images", 0))),
            ])  # fmt: skip
    if not any(row[-1] != "0" for row in rows):  # the usual case: no column of zeros
        header, rows = header[:-1], [row[:-1] for row in rows]
    return table(header, rows) + (
        "\n\nsamples/s is the run's mean over its timed intervals (samples trained ÷ their "
        "seconds), not batch ÷ median step. *others' CPU* is the share of the machine's CPU "
        "time that processes other than the run used while it trained; ⚠ marks a cell measured "
        f"on a shared machine (above {CONTENDED_ABOVE:.0%}): its speed figures are not "
        "comparable with the others'. "
        "Each row is the stage that trains the method's objective at that batch (superclass: "
        "stage 1, not its LiT readout; siclip: the student, its teacher's forward included). "
        "Step times are means over the intervals between log steps (the device synchronised at "
        "each), the first interval and checkpoint writes left out; median and p10/p90 over those "
        "intervals. GPU utilisation is NVML's, sampled while the run trained (n/a without a GPU). "
        "Per-phase times and the loader-only figure come from `python -m bench.throughput`, which "
        "synchronises between phases: training does not pay for that."
    )


CONTENDED_ABOVE = 0.10  # harness.metrics.HostLoad's threshold, recorded per cell as "contended"


def _contention(cells: list[CellResult]) -> str:
    """The largest share of the machine other processes used while a seed's run trained."""
    loads = [c.main.throughput.get("host_load") or {} for c in cells]
    shares = [h["cpu_share_others"] for h in loads if h.get("cpu_share_others") is not None]
    if not shares:
        return "n/a"
    return f"{max(shares):.0%}" + (" ⚠" if any(h.get("contended") for h in loads) else "")


def _step_ms(t: dict) -> str:
    spread = (t.get("step_time_ms_p10"), t.get("step_time_ms_p90"))
    if any(v is None or math.isnan(v) for v in spread):
        return _num(t.get("step_time_ms_median"))
    return f"{_num(t.get('step_time_ms_median'))} [{_num(spread[0])}, {_num(spread[1])}]"


def _median_dict(dicts: list[dict]) -> dict:
    """Each number's median over the seeds' runs (the mean of the middle two for an even count)."""
    out = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts if isinstance(d.get(key), int | float)]
        if values:
            out[key] = statistics.median(values)
    return out


def cost_section(sweep: Sweep) -> str:
    header = ["method", "stage", "samples seen", "trainable params", "total params", "frozen params",
              "train GFLOP/sample", "inference MFLOP/image"]  # fmt: skip
    rows = []
    smallest = min(sweep.batches) if sweep.batches else None
    for method in sweep.rows:
        cell = next((c for c in sweep.cells if c.row == method and c.batch == smallest), None)
        if cell is None:
            continue
        for st in cell.stages:
            c, stage = st.costs, st.name + (" (shared)" if st.shared else "")
            if not c:  # not counted yet (a cell still running or never started): no zeros
                rows.append([method, stage, *["n/a"] * (len(header) - 2)])
                continue
            rows.append([
                method, stage, f"{st.samples_seen:,}",
                f"{c.get('params_trainable', 0):,}", f"{c.get('params_total', 0):,}", f"{c.get('params_frozen', 0):,}",
                _num(c.get("train_flops_per_sample", 0) / 1e9, 3), _num(c.get("inference_flops_per_image", 0) / 1e6, 1),
            ])  # fmt: skip
    return (
        table(header, rows)
        + f"\n\nRows are the cells at batch {smallest}; FLOPs per sample depend on the batch only through the contrastive terms."
    )


def stage_metrics_section(sweep: Sweep) -> str:
    """Metrics of every non-final stage (superclass before LiT, siclip's teacher)."""
    rows, seen = [], set()
    for cell in sweep.cells:
        for st in cell.stages[:-1]:
            if st.run_dir in seen or not st.metrics:
                continue
            seen.add(st.run_dir)
            m = st.metrics
            rows.append([cell.row, st.name, str(st.run.get("train", {}).get("batch_size", "?")),
                         _num(m.get("i2t_r1")), _num(m.get("t2i_r1")), _num(m.get("zeroshot_mean_top1")),
                         _num(m.get("linprobe_mean_top1"))])  # fmt: skip
    if not rows:
        return ""
    header = ["method", "stage", "batch", "i2t R@1", "t2i R@1", "zero-shot", "linear probe"]
    return "## Earlier stages (superclass before LiT, teachers)\n\n" + table(header, rows) + "\n"


def status_section(sweep: Sweep) -> str:
    bad = [c for c in sweep.cells if not c.finished]
    text = f"{len(sweep.cells) - len(bad)} of {len(sweep.cells)} cells finished."
    if bad:
        rows = [
            [
                c.name,
                _status_text(c),
                str(c.final.status.get("step", "")),
                str(c.final.status.get("reason", ""))[:120],
            ]
            for c in bad
        ]
        text += "\n\n" + table(["cell", "status", "step", "reason"], rows)
    return text


def _status_text(cell: CellResult) -> str:
    """The cell's status; a ``running`` one that no live process holds is named stale."""
    status = cell.final.status
    if cell.status != "running" or cell.directory is None or lock_is_held(cell.directory):
        return cell.status
    return f"running? (stale: pid {status.get('pid', '?')} on {status.get('host', '?')} is gone)"


def provenance(sweep: Sweep, peak: float | None, peak_how: str) -> str:
    runs = [c.final.run for c in sweep.cells if c.final.run]
    first = runs[0] if runs else {}
    train = first.get("train", {})
    decisions = {}
    for r in runs:
        decisions.setdefault(r.get("method"), r.get("method_decisions", []))
    lines = [
        f"- **git commit**: {sweep.record.get('git_commit', 'unknown')}",
        f"- **packages**: {', '.join(f'{k} {v}' for k, v in sweep.record.get('packages', {}).items())}",
        f"- **device**: {first.get('device', 'unknown')}; **world size**: {sweep.record.get('world_size', 1)}",
        f"- **device peak** (for MFU): {_num(peak / 1e9 if peak else None, 0)} GFLOP/s ({peak_how})",
        f"- **model**: {first.get('model', '?')}; **data**: {first.get('data', {}).get('name', '?')}",
        f"- **budget rule**: {train.get('budget', 'samples')} — {train.get('train_samples', '?'):,} samples seen per run"
        if isinstance(train.get("train_samples"), int)
        else f"- **budget rule**: {train.get('budget', '?')}",
        f"- **learning-rate rule**: {train.get('lr_rule', '?')} from base batch {train.get('base_batch', '?')} "
        f"(lr {train.get('lr', '?')} at the base batch), cosine with {train.get('warmup_samples', '?')} warmup samples",
        f"- **seeds**: {sweep.seeds}; **batch sizes**: {sweep.batches}; **methods**: {sweep.methods}",
        f"- **axes**: {json.dumps(sweep.record.get('axes', {}))}; extra bindings: {sweep.record.get('bindings', [])}",
    ]
    for method, items in decisions.items():
        if items:
            lines.append(
                f"- **{method} [decision]s** (not the authors' exact recipe): " + "; ".join(items)
            )
    hashes = ", ".join(f"`{c.name}`" for c in sweep.cells)
    lines.append(f"- **cells (values__config-hash)**: {hashes}")
    return "\n".join(lines)


STATS_NOTE = (
    "Cells show mean ± 95% CI (Student t) across seeds when there are several seeds, otherwise "
    "the single run's value with a 95% bootstrap CI over test images ([low, high]; "
    f"{stats.BOOTSTRAP_SAMPLES} resamples of images, each with all its captions; for the means over "
    "label tasks, of the labelled images, each with its label in every task; a draw of exactly 0 "
    "counts half to each tail of a p-value). The slope is the "
    "least-squares change of the metric per doubling of the batch (95% CI), over every run of the method. "
    "Comparisons against clip are paired at the same batch and seed: a paired t-test across seeds "
    "(p=n/a where every seed gives the same difference), or with one seed a paired bootstrap over "
    "the same resampled test images (two-sided percentile p-value). "
    "The gap slope is the change of (method − clip) per doubling of the batch: negative means the "
    "method's advantage is larger at small batch (the direction SuperCLIP reports); with one seed its "
    "CI and p-value come from resampling the same test images for every batch and both methods."
)


def build_report(sweep_dir: str | Path) -> Path:
    """Write REPORT.md, report.json, plots/ and the TensorBoard hparams view; returns REPORT.md."""
    from reports.hparams import write_hparams
    from reports.plots import plot_metric

    sweep = load_sweep(sweep_dir)
    groups = grouped(sweep)
    peak = sweep.record.get("device_peak_flops")
    peak_how = sweep.record.get("device_peak_how", "not measured")
    numbers: dict[str, Any] = {"metrics": {}}
    sections = []
    for metric, title in METRICS:
        text, nums = metric_section(sweep, metric, title, groups)
        if text:
            sections.append(text)
            numbers["metrics"][metric] = nums
            plot_metric(sweep, metric, title, nums, sweep.directory / "plots" / f"{metric}.png")
    comparisons, numbers["comparisons"] = comparison_section(sweep, groups)
    out = sweep.directory / REPORT_NAME
    _replace(
        out,
        "\n\n".join(
            [
                f"# Batch sweep report: {sweep.directory.name}",
                *smoke_check_note(sweep),
                provenance(sweep, peak, peak_how),
                "## Status\n\n" + status_section(sweep),
                "## Quality by method and batch size\n\n" + STATS_NOTE,
                *sections,
                "## Paired comparison against clip\n\n"
                + (comparisons or "No clip baseline in this sweep."),
                "## Throughput\n\n" + throughput_section(sweep, groups, peak),
                "## Parameters and compute\n\n" + cost_section(sweep),
                stage_metrics_section(sweep),
            ]
        )
        + "\n",
    )
    _replace(sweep.directory / "report.json", json.dumps(numbers, indent=1, default=str))
    write_hparams(sweep, sweep.directory / "tb_hparams")
    return out


def smoke_check_note(sweep: Sweep) -> list[str]:
    """A sweep configured as a smoke check (``Grid.smoke_check``) says so before any number."""
    if not sweep.record.get("smoke_check"):
        return []
    return [
        "> **A smoke check, not a result.** This sweep is configured as a smoke check "
        "(`Grid.smoke_check = True`): it trains each cell on a budget far too small to compare "
        "methods, to show that every method runs end to end and that the report is whole. Its "
        "numbers sit near the chance levels in the table titles, and its CIs and p-values say "
        "nothing about the methods. The main job is `configs/batch_sweep.gin`."
    ]


def _replace(path: Path, text: str) -> None:
    """Write beside ``path``, then rename over it: a reader never sees half a report."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
