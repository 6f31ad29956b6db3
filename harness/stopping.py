"""Stop signals: the way clusters, schedulers and users stop a run.

``timeout``, ``scancel``, SLURM pre-emption, ``docker stop`` and Ctrl-C signal every process of
a group at once. The process that trains owns the shutdown: its loader workers ignore these
signals (``ignore_in_worker``), and the training loop, told by the handler, saves a checkpoint
at the next step boundary and ends ``interrupted`` (exit 130). Outside the loop (setting up,
evaluating) the handler raises ``Interrupted`` at once: the last checkpoint is already on disk.

SIGUSR1 is what ``sbatch --signal=USR1@<seconds>`` sends before a time limit or pre-emption;
it is handled like SIGTERM (the SLURM launcher's script then requeues the job).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT


class Interrupted(Exception):
    """A stop signal ended the run; ``step`` is the step of the checkpoint left behind."""

    def __init__(self, signum: int | None, step: int | None = None, *, where: str = ""):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        at = f" at step {step}; checkpoint saved" if step is not None else ""
        super().__init__(f"stopped by {name}{where}{at}")


_requested: int | None = None
_deferring = 0  # > 0 inside the training loop: the loop acts on the request itself


def requested() -> int | None:
    """The stop signal received so far in this process, or None."""
    return _requested


def _handle(signum: int, frame) -> None:
    global _requested
    _requested = signum
    if not _deferring:
        raise Interrupted(signum)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Handle the stop signals for the duration (nests; the previous handlers come back)."""
    global _requested, _reaper
    if not _reaper:
        atexit.register(_end_workers_left)  # runs before multiprocessing's own exit handler
        _reaper = True
    previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if all(h is not _handle for h in previous.values()):  # the outermost: forget it
            _requested = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: a stop signal is only remembered (``requested``); the caller acts on it at a safe
    point. A signal that came just before is acted on at the first such point."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


_reaper = False


def _end_workers_left() -> None:
    """At exit, end the loader workers whose loader was never shut down (an exception's
    traceback kept it alive): they ignore SIGTERM, so multiprocessing's own exit handler, which
    terminates daemonic children with it and then joins them, would wait for them forever."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


def ignore_in_worker() -> None:
    """For loader worker processes: the stop signals are the training process's to act on."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
