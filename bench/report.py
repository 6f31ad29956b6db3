"""Derived figures (samples/s, MFU, loader ratio, I/O-bound flag) and the JSON + markdown output
of ``bench.throughput``."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from bench.measure import NA
from bench.phases import PHASES
from harness.files import write_json_atomic

BASELINE = "clip"
BARE_ROWS = ("bare", "bare+loader")  # bench/bare.py baselines, in memory and fed live


def io_bound(loader_ms_per_batch: float, compute_ms_per_step: float) -> bool:
    """True when the loader alone produces a batch more slowly than the step computes one."""
    return loader_ms_per_batch > compute_ms_per_step


def compute_ms(phases: dict[str, Any]) -> float:
    """Median step time without waiting for data: the sum of the other phases' medians."""
    return sum(
        phases[name]["median_ms"]
        for name in PHASES
        if name not in ("data_wait", "frozen_forward") and phases.get(name)
    )


def derive(
    *,
    steps: dict,
    phases: dict,
    loader: dict,
    costs: dict,
    peak: tuple[float, str],
    batch: int,
    method_info: dict,
    world_size: int = 1,
) -> dict[str, Any]:
    """``batch`` is global: samples/s are for all ranks, over ``world_size`` device peaks."""
    step_ms = steps["step"]["median_ms"]
    samples_per_s = batch / (step_ms / 1000)
    flops = costs["train_flops_per_sample"]
    compute = compute_ms(phases)
    frozen = phases.get("frozen_forward")
    record = {
        **steps,
        "samples_per_s": samples_per_s,
        "phases_ms": phases,
        "train_flops_per_sample": flops,
        "mfu": flops * samples_per_s / (peak[0] * world_size),
        "peak_flops": peak[0],
        "peak_source": peak[1],
        "loader": loader,
        "compute_ms": compute,
        "loader_speedup": loader["samples_per_s"] / samples_per_s,
        "io_bound": io_bound(loader["ms_per_batch"], compute),
        "costs": costs,
        "method_info": method_info,
    }
    if frozen is not None:
        record["step_excluding_frozen_ms"] = step_ms - frozen["median_ms"]
    return record


def derive_bare(result: dict, *, batch: int, live: bool = False) -> dict[str, Any]:
    source = "the harness's loader, live" if live else "in-memory batches"
    return {
        **result,
        "samples_per_s": batch / (result["step"]["median_ms"] / 1000),
        "note": f"open_clip CLIP + ClipLoss + fused AdamW on {source}; no harness",
    }


# ---------------------------------------------------------------- files


def write(out: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"header": header, "rows": rows})
    md = out / "results.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(header, rows))
    os.replace(tmp, md)
    return [out / "results.json", md]


def _f(value: Any, fmt: str = ".1f") -> str:
    if value is None:
        return NA
    return format(value, fmt)


def _phase(row: dict, name: str) -> str:
    value = row.get("phases_ms", {}).get(name)
    return NA if value is None else _f(value["median_ms"])


# ---------------------------------------------------------------- rounds


def cell_rounds(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Every (method, batch) cell's rows, one per round, cells in method-then-batch order."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    grouped: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(rows, key=lambda r: (methods.index(r["method"]), r["batch_size"])):
        grouped.setdefault((r["method"], r["batch_size"]), []).append(r)
    return grouped


def median_round(rounds: list[dict]) -> dict:
    """The round with the median step time (the lower one of two middles): a measured row, not
    a mix of rounds. A cell that failed in every round gives its first error."""
    ok = sorted((r for r in rounds if "error" not in r), key=lambda r: r["step"]["median_ms"])
    return ok[(len(ok) - 1) // 2] if ok else rounds[0]


def round_ratios(
    rows: list[dict], method: str, batch: int, base: str, key: str = "step"
) -> list[float]:
    """``method``'s step time over ``base``'s at ``batch``, within each round that has both.

    ``key`` "step" divides step medians; "excl_frozen" divides ``method``'s step without its
    frozen forward by ``base``'s step."""
    by_round: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["batch_size"] == batch and "error" not in r:
            by_round.setdefault(r.get("round", 0), {})[r["method"]] = r
    ratios = []
    for pair in by_round.values():
        if method not in pair or base not in pair:
            continue
        num = pair[method]
        value = num["step"]["median_ms"] if key == "step" else num.get("step_excluding_frozen_ms")
        if value is not None:
            ratios.append(value / pair[base]["step"]["median_ms"])
    return ratios


def ratio_text(values: list[float], digits: int = 2, spread: bool = True) -> str:
    """ "1.05" from one round; "1.05 [1.02-1.09]" (median [min-max]) from several."""
    if not values:
        return NA
    text = f"{statistics.median(values):.{digits}f}"
    if spread and len(values) > 1:
        text += f" [{min(values):.{digits}f}–{max(values):.{digits}f}]"
    return text


# ---------------------------------------------------------------- the table


COLUMNS = (
    "method", "batch", "step ms median [p10, p90]", "samples/s", "step ÷ clip",
    "excl. frozen ÷ clip", "data wait", "prep", "fwd", "frozen fwd", "loss", "bwd", "opt",
    "comm", "peak mem MB", "MFU %", "GPU util %", "GPU mem MB", "loader samples/s",
    "loader ÷ step", "I/O-bound",
)  # fmt: skip


def _row(row: dict, rows: list[dict]) -> list[str]:
    if "error" in row:
        return [row["method"], str(row["batch_size"]), f"error: {row['error'].splitlines()[-1]}"]
    step = row["step"]
    gpu = row.get("gpu", {})
    loader = row.get("loader")
    method, batch = row["method"], row["batch_size"]
    return [
        method, str(batch),
        f"{step['median_ms']:.1f} [{step['p10_ms']:.1f}, {step['p90_ms']:.1f}]",
        f"{row['samples_per_s']:.0f}",
        ratio_text(round_ratios(rows, method, batch, BASELINE), spread=False),
        ratio_text(round_ratios(rows, method, batch, BASELINE, "excl_frozen"), spread=False),
        *(_phase(row, p) for p in PHASES),
        f"{row['peak_memory_mb']:.0f}",
        _f(row["mfu"] * 100 if "mfu" in row else None, ".2f"),
        _f(gpu.get("gpu_util_mean_pct"), ".0f"), _f(gpu.get("gpu_mem_used_max_mb"), ".0f"),
        _f(loader["samples_per_s"] if loader else None, ".0f"),
        _f(row.get("loader_speedup"), ".1f"),
        NA if "io_bound" not in row else ("**yes**" if row["io_bound"] else "no"),
    ]  # fmt: skip


def markdown(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    nvml = next((r["gpu"]["nvml"] for r in rows if "gpu" in r), NA)
    rounds = header.get("rounds", 1)
    lines = [
        "# Training-step throughput",
        "",
        f"- date: {header['date']}; device: {header['device_name']}; {header['cpu_cores']} CPU "
        f"cores; torch {header['torch']} with {header['torch_threads']} intra-op threads; "
        f"open_clip {header['open_clip']}; python {header['python']}",
        f"- {header['warmup_steps']} warm-up steps excluded, then {header['timed_steps']} timed "
        "steps of `Trainer.fit` (device synchronised at step boundaries only); medians with "
        "p10 and p90",
        f"- MFU: counted training FLOPs per sample (torch FlopCounterMode) × samples/s over "
        f"{header['peak_flops'] / 1e9:.1f} GFLOP/s ({header['peak_source']})",
        f"- phases (ms, medians over {header['phase_steps']} steps): {header['phases_note']}",
        f"- loader: the same loader configuration alone, {header['loader_batches']} batches; "
        "I/O-bound when it takes longer per batch than the step's compute (the phases without "
        "data wait); loader ÷ step = loader samples/s over step samples/s",
        f"- peak memory: {_memory_kinds(rows)}; GPU utilisation and memory: NVML, "
        f"{nvml if nvml else NA}",
        f"- load average (1, 5, 15 min) before/after each cell: {_loads(rows)}",
    ]
    if rounds > 1:
        lines.append(
            f"- {rounds} rounds: every cell measured {rounds} times in fresh processes, round "
            "after round, batch size by batch size; each row is the cell's round with the median "
            "step time, and each ratio is the median of the ratios taken within a round"
        )
    if header.get("gin_params"):
        lines.append(f"- extra gin bindings: {header['gin_params']}")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cell in cell_rounds(rows).values():
        cells = _row(median_round(cell), rows)
        cells += [""] * (len(COLUMNS) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_summary(rows, rounds)]
    notes = _notes(rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _summary(rows: list[dict], rounds: int) -> list[str]:
    """Per batch size: clip against the bare loop, each method against clip, loader against step."""
    title = "Step time ratios (medians)"
    if rounds > 1:
        title = f"Step time ratios (median [min–max] over the {rounds} rounds)"
    out = [f"{title} and loader headroom, per batch size:", ""]
    cells = cell_rounds([r for r in rows if "error" not in r])
    for batch in sorted({b for _, b in cells}):
        parts = []
        for name in BARE_ROWS:
            ratios = round_ratios(rows, BASELINE, batch, name)
            if ratios:
                parts.append(f"clip ÷ {name} {ratio_text(ratios, digits=3)}")
        for method, b in cells:
            if b != batch or method in (*BARE_ROWS, BASELINE):
                continue
            ratios = round_ratios(rows, method, batch, BASELINE)
            if not ratios:
                continue
            text = f"{method} ÷ clip {ratio_text(ratios)}"
            excl = round_ratios(rows, method, batch, BASELINE, "excl_frozen")
            if excl:
                text += f" ({ratio_text(excl)} without its frozen forward)"
            parts.append(text)
        clip = cells.get((BASELINE, batch))
        if clip:
            speedups = [r["loader_speedup"] for r in clip if "loader_speedup" in r]
            if speedups:
                parts.append(f"loader ÷ clip step {ratio_text(speedups, digits=1)}×")
        out.append(f"- batch {batch}: " + "; ".join(parts))
    return out


def _memory_kinds(rows: list[dict]) -> str:
    kinds = sorted({r["memory_kind"] for r in rows if "memory_kind" in r})
    return ", ".join(kinds) or NA


def _loads(rows: list[dict]) -> str:
    loads = [(r.get("load_avg_before"), r.get("load_avg_after")) for r in rows if "error" not in r]
    first = [b[0] for b, _ in loads if b] + [a[0] for _, a in loads if a]
    if not first:
        return NA
    return f"1-min between {min(first):.2f} and {max(first):.2f}"


def _notes(rows: list[dict]) -> list[str]:
    notes = []
    if any(r["method"] == "bare" for r in rows):
        notes.append(
            "`bare`: the same CLIP with no harness (open_clip CLIP + ClipLoss + fused AdamW on "
            "batches already in memory, no loader, logging or bookkeeping), timed the same way."
        )
    if any(r["method"] == "bare+loader" for r in rows):
        notes.append(
            "`bare+loader`: the same bare loop fed live by the harness's loader (same workers, "
            "fetch and normalisation inside the timed step): what any trainer that loads its own "
            "data on these cores pays; clip ÷ bare+loader is the trainer's own overhead."
        )
    for r in rows:
        teacher = (r.get("method_info") or {}).get("teacher")
        if teacher:
            notes.append(
                f"`{r['method']}` at batch {r['batch_size']}: frozen teacher {teacher['params']:,} "
                f"parameters ({teacher['source']}); `excl. frozen` subtracts its forward time."
            )
            break
    return notes
