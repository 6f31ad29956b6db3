"""Derived figures (samples/s, MFU, loader ratio, I/O-bound flag) and the JSON + markdown output
of ``bench.throughput``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.measure import NA
from bench.phases import PHASES
from harness.manifest import write_json_atomic

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


def _ratio(row: dict, base: dict | None, key: str = "median_ms") -> str:
    if base is None or "step" not in base:
        return NA
    return f"{row['step'][key] / base['step'][key]:.2f}"


COLUMNS = (
    "method", "batch", "step ms median [p10, p90]", "samples/s", "step ÷ clip",
    "excl. frozen ÷ clip", "data wait", "prep", "fwd", "frozen fwd", "loss", "bwd", "opt",
    "comm", "peak mem MB", "MFU %", "GPU util %", "GPU mem MB", "loader samples/s",
    "loader ÷ step", "I/O-bound",
)  # fmt: skip


def _row(row: dict, clip: dict | None) -> list[str]:
    if "error" in row:
        return [row["method"], str(row["batch_size"]), f"error: {row['error'].splitlines()[-1]}"]
    step = row["step"]
    gpu = row.get("gpu", {})
    loader = row.get("loader")
    excl = row.get("step_excluding_frozen_ms")
    excl_ratio = NA
    if excl is not None and clip is not None and "step" in clip:
        excl_ratio = f"{excl / clip['step']['median_ms']:.2f}"
    return [
        row["method"], str(row["batch_size"]),
        f"{step['median_ms']:.1f} [{step['p10_ms']:.1f}, {step['p90_ms']:.1f}]",
        f"{row['samples_per_s']:.0f}", _ratio(row, clip), excl_ratio,
        *(_phase(row, p) for p in PHASES),
        f"{row['peak_memory_mb']:.0f}",
        _f(row["mfu"] * 100 if "mfu" in row else None, ".2f"),
        _f(gpu.get("gpu_util_mean_pct"), ".0f"), _f(gpu.get("gpu_mem_used_max_mb"), ".0f"),
        _f(loader["samples_per_s"] if loader else None, ".0f"),
        _f(row.get("loader_speedup"), ".1f"),
        NA if "io_bound" not in row else ("**yes**" if row["io_bound"] else "no"),
    ]  # fmt: skip


def markdown(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    clips = {r["batch_size"]: r for r in rows if r["method"] == BASELINE and "error" not in r}
    nvml = next((r["gpu"]["nvml"] for r in rows if "gpu" in r), NA)
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
    if header.get("gin_params"):
        lines.append(f"- extra gin bindings: {header['gin_params']}")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = _row(row, clips.get(row["batch_size"]))
        cells += [""] * (len(COLUMNS) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_summary(rows, clips)]
    notes = _notes(rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _summary(rows: list[dict], clips: dict[int, dict]) -> list[str]:
    """Per batch size: clip against the bare loop, each method against clip, loader against step."""
    ok = [r for r in rows if "error" not in r]
    out = ["Step time ratios (medians) and loader headroom, per batch size:", ""]
    for batch in sorted({r["batch_size"] for r in ok}):
        clip, parts = clips.get(batch), []
        for name in BARE_ROWS:
            bare = next((r for r in ok if r["method"] == name and r["batch_size"] == batch), None)
            if clip and bare:
                parts.append(f"clip ÷ {name} {_div(clip, bare):.3f}")
        for r in ok:
            if r["batch_size"] != batch or r["method"] in (*BARE_ROWS, BASELINE) or not clip:
                continue
            text = f"{r['method']} ÷ clip {_div(r, clip):.2f}"
            if "step_excluding_frozen_ms" in r:
                text += f" ({r['step_excluding_frozen_ms'] / clip['step']['median_ms']:.2f} without its frozen forward)"
            parts.append(text)
        if clip and "loader_speedup" in clip:
            parts.append(f"loader ÷ clip step {clip['loader_speedup']:.1f}×")
        out.append(f"- batch {batch}: " + "; ".join(parts))
    return out


def _div(a: dict, b: dict) -> float:
    return a["step"]["median_ms"] / b["step"]["median_ms"]


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
