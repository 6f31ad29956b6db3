"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds the model, the method's own state (heads, buffers such as IDF statistics),
the optimiser, the scheduler, the step, the samples seen, every RNG state and the data
position, so a killed run resumes where it stopped. Only tensors and plain Python containers
are stored, which is what ``weights_only=True`` accepts: loading never executes code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import faults, files
from harness.errors import CheckpointError

LATEST = "latest.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``. Its tensors may arrive on the GPU (a checkpoint loaded with
    ``map_location`` = the training device): the generators take CPU byte tensors."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy(), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """torch.save to a temporary file beside ``path``, then rename it over ``path``: a crash
    at any point leaves the previous checkpoint or the new one, never a torn file. A failed
    write (a full disk, a file-size limit) raises the OSError that caused it, naming ``path``:
    torch's own message for it is an internal assertion ('enforce fail at ...')."""
    with files.replaced_atomically(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(payload, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None
        faults.during_checkpoint_write(int(payload.get("step", -1)))
    return Path(path)


class _RecordingWriter:
    """A binary file for torch.save that keeps the first OSError its writes raised."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def latest(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / LATEST


def describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """A short human description of how two state dicts differ (for resume errors)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: {tuple(found[k].shape)} in checkpoint vs {tuple(v.shape)} now"
        for k, v in expected.items()
        if k in found
        and torch.is_tensor(v)  # a module's extra state (plain data) has no shape
        and torch.is_tensor(found[k])
        and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    return ", ".join(parts)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that explains every difference in one error."""
    problem = describe_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{what} does not match this run's {what}: {problem}")
    module.load_state_dict(state)
