"""No host-device synchronisation inside a training step, for every method and variant.

A sync stalls the host until the GPU has caught up, so the next kernels are launched late and
the GPU idles while they are: with small models the step becomes launch-bound. The trainer
syncs only at log and checkpoint steps; between them, ``torch.cuda.set_sync_debug_mode`` must
see nothing. Runs where a GPU is lent (``device`` tool); CI has none and skips it.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch

import methods
from bench.cell import build_cell, cell_bindings

REPO = Path(__file__).resolve().parent.parent
STEPS = 6  # steps 2..STEPS run under the sync watch; the first warms the allocator up
CASES = [
    (name, variant)
    for name in methods.registered_names()
    for variant in methods.method_class(name).example_variants
]


def _repo_frames(stack: traceback.StackSummary) -> str:
    """The frames of this repository's code (not tests/) that led to the sync, innermost last."""
    ours = [
        f"{Path(f.filename).relative_to(REPO)}:{f.lineno} ({f.name})"
        for f in stack
        if Path(f.filename).is_relative_to(REPO) and "tests" not in Path(f.filename).parts
    ]
    return " <- ".join(reversed(ours[-3:]))


def sync_sites_in_steps(trainer, total_steps: int) -> list[str]:
    """Run ``trainer.fit`` and return where each synchronising CUDA call between steps 2 and
    ``total_steps`` came from (the final log and checkpoint sync on purpose and are left out)."""
    sites: list[str] = []

    def on_step(step: int) -> None:
        torch.cuda.set_sync_debug_mode("warn" if step < total_steps else "default")

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        stack = traceback.extract_stack()[:-1]
        in_hook = any(f.name == "on_step" and f.filename == __file__ for f in stack)
        if "synchroniz" in str(message) and not in_hook:  # the hook's own mode switch
            sites.append(_repo_frames(stack))

    trainer.on_step = on_step
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # catch_warnings restores the original on exit
        try:
            trainer.fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the device tool's)")
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_training_steps_never_wait_for_the_gpu(name, variant, tiny_data, tmp_path):
    bindings = cell_bindings(
        name, 16, model="micro-vit", steps=STEPS, workdir=tmp_path, data=str(tiny_data),
        extra=["DataConfig.num_workers = 1", "TrainConfig.log_every_steps = 1000"], variant=variant,
    )  # fmt: skip
    cell = build_cell(bindings, run_dir=tmp_path / "run")
    try:
        sites = sync_sites_in_steps(cell.trainer, STEPS)
    finally:
        cell.trainer.close()
    assert not sites, f"{name}/{variant}: {len(sites)} syncs, at:\n" + "\n".join(sorted(set(sites)))
