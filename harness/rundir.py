"""The run directory: ``RunDir`` names every file in it and is the only writer of status.json.

The layout is documented in docs/run-directory.md; ``reports/`` reads against that page
without importing this package. A multi-stage run (superclass, siclip) is a folder with
``stages.json`` and one run directory per stage; its last stage is the method's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.files import read_json, write_json_atomic

FINISHED = "finished"
STATUSES = ("running", FINISHED, "diverged", "interrupted", "failed", "oom")
PACKAGES = ("torch", "torchvision", "open_clip_torch", "webdataset", "gin-config", "numpy",
            "scikit-learn")  # fmt: skip
# an exception's last line, in a cell's log (torchrun prefixes each worker's with "[rankN]:")
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b:? ")


class RunDirBusy(UserError):
    """Another live process trains (or evaluates) this run directory."""


class RunDir:
    """One run's folder. Its files, by what they hold (docs/run-directory.md)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        p = self.path
        self.config = p / "config.gin"  # every binding in force
        self.operative_config = p / "operative_config.gin"  # the bindings the run used
        self.record = p / "run.json"  # method, model, data, budget, provenance, spec
        self.status_file = p / "status.json"
        self.metrics = p / "metrics.jsonl"
        self.tensorboard = p / "tb"
        self.costs = p / "costs.json"
        self.throughput = p / "throughput.json"
        self.eval = p / "eval.json"
        self.eval_ranks = p / "eval_ranks.json"
        self.stages_file = p / "stages.json"  # a multi-stage run's stages, in order
        self.checkpoint = p / "checkpoints" / "latest.pt"
        self.log = p / "log.txt"  # a sweep cell's output
        self.lock = p / ".lock"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- status -------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return read_json(self.status_file) or {}

    def write_status(self, status: str, **details: Any) -> None:
        payload = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
        payload.setdefault("pid", os.getpid())  # who wrote it: a "running" one may be stale
        payload.setdefault("host", socket.gethostname())
        write_json_atomic(self.status_file, payload)

    @property
    def finished(self) -> bool:
        return self.status().get("status") == FINISHED and self.eval.exists()

    def record_exit(self, code: int, *, seconds: float, stopped_by: str | None) -> str:
        """After a cell's process ended (exit ``code``): keep the status it wrote, or say why it
        wrote none (killed, crashed before training), with every rank's exception line and the
        log's tail. Returns the final status."""
        final = self.final()
        status = final.status()
        if code == 0 and status.get("status") == FINISHED:
            return FINISHED
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        if status.get("status") in (None, "running", FINISHED) and stopped_by:
            status = {
                "status": "interrupted",
                "reason": f"stopped by {stopped_by} (exit code {code})",
            }
        elif status.get("status") in (None, "running", FINISHED):
            reason = f"exit code {code}" + (
                " (killed by a signal: out of memory?)" if code < 0 else ""
            )
            status = {"status": "failed", "reason": reason}
        final.write_status(
            status["status"], **{k: v for k, v in status.items() if k not in ("status", "time")},
            exit_code=code, errors=[x for x in lines if EXCEPTION_LINE.match(x)][-10:],
            log_tail=lines[-30:], seconds=round(seconds, 1),
        )  # fmt: skip
        return status["status"]

    # -- stages -------------------------------------------------------
    def stages(self) -> list[dict[str, Any]]:
        """stages.json's entries: name, run_dir (relative to here), shared, inputs."""
        return (read_json(self.stages_file) or {}).get("stages", [])

    def final(self) -> RunDir:
        """The run directory holding the result: the last stage of a multi-stage run."""
        stages = self.stages()
        return RunDir(self.path / stages[-1]["run_dir"]) if stages else self

    def guard(self) -> RunDir:
        """The directory whose lock guards this one: a multi-stage run's own folder for a stage
        folder inside it (the trainer locks the whole run), else this one."""
        parent = RunDir(self.path.parent)
        own = {(parent.path / s["run_dir"]).resolve() for s in parent.stages()}
        return parent if self.path.resolve() in own else self

    def earlier_stages_now(self) -> list[str]:
        """Bindings of a stage's inputs (superclass.init_from, siclip.teacher) to where the
        stages they name are now: its operative config holds the absolute paths they had when
        it ran, which a moved or copied sweep no longer has."""
        stages = RunDir(self.path.parent).stages()
        where = {s["name"]: (self.path.parent / s["run_dir"]).resolve() for s in stages}
        me = next((s for s in stages if where[s["name"]] == self.path.resolve()), {})
        return [f"{param} = '{where[source]}'" for param, source in me.get("inputs", {}).items()]

    # -- one process per run directory -----------------------------------
    @contextlib.contextmanager
    def held(self, *, wait: bool = False, doing: str = "training") -> Iterator[None]:
        """Hold this directory's lock for the duration: one process per run directory.

        An flock, so the kernel lets go of it when its holder dies however it dies (``kill -9``
        included): the next process takes it over. Held by another live process, it is refused
        with the holder's pid, or with ``wait`` waited for (a shared stage another run trains).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise RunDirBusy(
                    f"{self.path} is in use by another process ({_holder(handle)}); two "
                    "processes in one run directory would interleave its files: wait for it, "
                    "or stop it first"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "doing": doing,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))  # fmt: skip
            handle.flush()
            _held.add(handle.fileno())
            try:
                yield
            finally:
                _held.discard(handle.fileno())
                fcntl.flock(handle, fcntl.LOCK_UN)

    def holder(self) -> str | None:
        """Who holds the lock ('pid N on HOST, training since T'), or None when nobody does (a
        process that died holding it holds it no more)."""
        if not self.lock.exists():
            return None
        with open(self.lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def left_running(self) -> str | None:
        """What status.json says of a run left ``running`` by a process that is gone, or None.
        For the holder of the lock (no other process can be running it) and for ``stale``."""
        status = self.status()
        if status.get("status") != "running":
            return None
        return (
            f"{self.path} was left 'running' by pid {status.get('pid', '?')} on "
            f"{status.get('host', '?')} at step {status.get('step', '?')} "
            f"({status.get('time', '?')}), which died without a word (killed?)"
        )

    def stale(self) -> str | None:
        """``left_running`` of this run or of a stage it owns, when no process holds it."""
        if self.holder() is not None:
            return None
        owned = [RunDir(self.path / s["run_dir"]) for s in self.stages() if not s.get("shared")]
        return next(filter(None, (r.left_running() for r in [self, *owned])), None)


def _holder(handle: Any) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "pid unknown"
    return f"pid {info['pid']} on {info['host']}, {info.get('doing', 'training')} since {info['since']}"


_held: set[int] = set()  # descriptors of the run-directory locks this process holds


def _let_go_in_child() -> None:
    """A forked child (a loader worker) shares its parent's lock: close its copy, so that the
    lock ends with the process that took it, not with the last of its workers."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


# ---------------------------------------------------------------- provenance


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
