"""A TensorBoard hparams view of the sweep: one run per cell, its axis values as hparams."""

from __future__ import annotations

import shutil
from pathlib import Path

from reports.report_metrics import HPARAM_METRICS


def write_hparams(sweep, folder: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    for cell in sweep.cells:
        if not cell.finished:
            continue
        hparams = {"method": cell.method, "batch_size": cell.batch, "seed": cell.seed}
        hparams.update(
            {
                k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in cell.values.items()
            }
        )
        metrics = {
            f"hparam/{m}": float(cell.final.metrics[m])
            for m in HPARAM_METRICS
            if m in cell.final.metrics
        }
        throughput = cell.main.throughput.get("samples_per_s")
        if throughput:
            metrics["hparam/samples_per_s"] = float(throughput)
        with SummaryWriter(log_dir=str(folder / cell.name)) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")
