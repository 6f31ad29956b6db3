"""Deliberate faults for the reliability tests; inert unless asked for.

Asked for by the gin parameter ``Faults.spec`` (so one cell of a grid can fail) or the
CLIPBENCH_FAULT environment variable, as ``<kind>@<step>[@<rank>]``:

- ``oom``: raise torch.OutOfMemoryError when the trainer reaches that step;
- ``crash``: raise RuntimeError there (on that rank only if given: a crashed torchrun worker);
- ``exit``: end the process at once with os._exit (like a segfault or the OOM killer);
- ``slow_checkpoint``: when the checkpoint of that step is written, sleep between writing the
  temporary file and renaming it, so a test can kill the run in the middle of the write.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from harness.errors import ConfigError

ENV = "CLIPBENCH_FAULT"
KINDS = ("oom", "crash", "exit", "slow_checkpoint")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None

    def due(self, kind: str, step: int, rank: int) -> bool:
        return self.kind == kind and self.step == step and self.rank in (None, rank)


_active: Fault | None = None


def parse_spec(spec: str) -> Fault | None:
    if not spec:
        return None
    parts = spec.split("@")
    if parts[0] not in KINDS or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ConfigError(f"fault {spec!r}: expected <kind>@<step>[@<rank>] with kind in {KINDS}")
    return Fault(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)


def activate(spec: str = "") -> None:
    """Arm this run's fault: ``spec`` (``Faults.spec``), else the environment's."""
    global _active
    _active = parse_spec(spec or os.environ.get(ENV, ""))


def at_step(step: int, rank: int) -> None:
    if _active is None:
        return
    if _active.due("oom", step, rank):
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step} (fault injection)")
    if _active.due("crash", step, rank):
        raise RuntimeError(f"injected crash at step {step} on rank {rank} (fault injection)")
    if _active.due("exit", step, rank):
        os._exit(9)


def during_checkpoint_write(step: int) -> None:
    if _active is not None and _active.kind == "slow_checkpoint" and _active.step == step:
        time.sleep(60)
