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
  .lock                  held (flock) by the process that trains the run; names its pid
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import UserError
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
    payload.setdefault("pid", os.getpid())  # who wrote it: a "running" one may be stale
    payload.setdefault("host", socket.gethostname())
    write_json_atomic(Path(run_dir) / "status.json", payload)


# ---------------------------------------------------------------- one trainer per directory

LOCK = ".lock"


class RunDirBusy(UserError):
    """Another live process trains (or evaluates) this run directory."""


@contextlib.contextmanager
def held(run_dir: str | Path, *, wait: bool = False, doing: str = "training") -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration: one process per run directory.

    An flock, so the kernel lets go of it when its holder dies however it dies (``kill -9``
    included): the next process takes it over. Held by another live process, it is refused
    with the holder's pid, or with ``wait`` waited for (a shared stage another run trains).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder_text(handle)
            raise RunDirBusy(
                f"{run_dir} is in use by another process ({holder}); two processes in one run "
                f"directory would interleave its files: wait for it, or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": since, "doing": doing}))  # fmt: skip
        handle.flush()
        _held.add(handle.fileno())
        try:
            yield
        finally:
            _held.discard(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)


_held: set[int] = set()  # descriptors of the run-directory locks this process holds


def _let_go_in_child() -> None:
    """A forked child (a loader worker) shares its parent's lock: close its copy, so that the
    lock ends with the process that took it, not with the last of its workers."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def _holder_text(handle: Any) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "pid unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, {info.get('doing', 'training')} since {info.get('since')}"


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir``'s lock ('pid N on HOST, training since T'), or None when nobody
    does (a process that died holding it holds it no more)."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def left_running(run_dir: Path) -> str | None:
    """What status.json says of a run left ``running`` by a process that is gone, or None.

    For the holder of the run's lock (no other process can be running it) and for
    ``stale_status``, which checks that nobody holds it."""
    status = read_status(run_dir) or {}
    if status.get("status") != "running":
        return None
    return (
        f"{run_dir} was left 'running' by pid {status.get('pid', '?')} on "
        f"{status.get('host', '?')} at step {status.get('step', '?')} ({status.get('time', '?')}),"
        " which died without a word (killed?)"
    )


def stale_status(run_dir: Path) -> str | None:
    """``left_running`` for ``run_dir`` or any stage it owns, when no process holds the run."""
    if lock_holder(run_dir) is not None:
        return None
    stages = (read_json(run_dir / "stages.json") or {}).get("stages", [])
    owned = [run_dir / s["run_dir"] for s in stages if not s.get("shared")]
    return next(filter(None, map(left_running, [run_dir, *owned])), None)


def guarding_dir(run_dir: Path) -> Path:
    """The directory whose lock guards ``run_dir``: a multi-stage run's own folder for a stage
    folder inside it (the trainer locks the whole run), else ``run_dir`` itself."""
    stages = read_json(run_dir.parent / "stages.json") or {}
    own = {(run_dir.parent / s["run_dir"]).resolve() for s in stages.get("stages", [])}
    return run_dir.parent if run_dir.resolve() in own else run_dir


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
