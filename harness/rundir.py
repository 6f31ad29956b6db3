"""The run directory: its layout, its status file and its provenance record.

RUN_DIR/
  operative_config.gin   the gin bindings this run used
  config.gin             every binding that was in force (for re-running)
  run.json               method, model config, data, derived budget, provenance
  status.json            running | finished | diverged | interrupted | failed | oom
  metrics.jsonl, tb/     training curves
  costs.json             parameter and FLOP counts
  throughput.json        samples/s, step time, data wait, peak memory
  eval.json              flat metric -> number
  eval_ranks.json        per-query ranks and correctness, for confidence intervals
  checkpoints/latest.pt
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.manifest import write_json_atomic

FINISHED = "finished"
PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "webdataset",
    "gin-config",
    "numpy",
    "scikit-learn",
)


def read_json(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / "status.json")


def write_status(run_dir: str | Path, status: str, **details: Any) -> None:
    payload = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
    write_json_atomic(Path(run_dir) / "status.json", payload)


def is_finished(run_dir: str | Path) -> bool:
    status = read_status(run_dir)
    return bool(
        status and status.get("status") == FINISHED and (Path(run_dir) / "eval.json").exists()
    )


def final_run_dir(cell_dir: Path) -> Path:
    """The run directory holding a cell's result: its last stage for multi-stage methods."""
    stages = read_json(cell_dir / "stages.json")
    if stages and stages.get("stages"):
        return cell_dir / stages["stages"][-1]["run_dir"]  # recorded relative to the cell
    return cell_dir


def earlier_stages_now(run_dir: Path) -> list[str]:
    """Bindings of a stage's inputs (superclass.init_from, siclip.teacher) to where the stages
    they name are now, from the ``stages.json`` beside it: its operative config holds the
    absolute paths they had when it ran, which a moved or copied sweep no longer has."""
    stages = (read_json(run_dir.parent / "stages.json") or {}).get("stages", [])
    where = {s["name"]: (run_dir.parent / s["run_dir"]).resolve() for s in stages}
    me = next((s for s in stages if where[s["name"]] == run_dir.resolve()), {})
    return [f"{param} = '{where[source]}'" for param, source in me.get("inputs", {}).items()]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=10, cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
