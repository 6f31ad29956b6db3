"""PNG plots of each metric against batch size, one line per method, with CI error bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def plot_metric(sweep, metric: str, title: str, numbers: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, entry in numbers.items():
        points = [(int(b), e) for b, e in entry["by_batch"].items() if e]
        if not points:
            continue
        xs = [b for b, _ in points]
        ys = [e["mean"] for _, e in points]
        err = [
            [e["mean"] - e["low"] for _, e in points],
            [e["high"] - e["mean"] for _, e in points],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sweep.batches, [str(b) for b in sweep.batches])
    ax.set_xlabel("global batch size")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
