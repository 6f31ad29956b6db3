"""With harness.host_memory on, a step's large tensors stop being page-faulted in every step."""

import subprocess
import sys

import pytest

from harness import host_memory
from tests.conftest import REPO

# page faults of each of 24 forward+backward passes of a logsumexp over 512 x 49,408 logits
# (superclip's classification loss at batch 512), printed by a fresh process
PROBE = """
import resource, sys, torch
from harness import host_memory
if sys.argv[1] == "on":
    assert host_memory.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
z = torch.ones(512, 49408, requires_grad=True)
for _ in range(24):
    before = faults()
    torch.logsumexp(z, dim=1).sum().backward()
    print(faults() - before)
"""


def faults_per_step(mode: str) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(n) for n in done.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_large_step_tensors_are_reused_instead_of_faulted_in_again():
    tensor_pages = 512 * 49408 * 4 // 4096
    default = faults_per_step("off")
    kept = faults_per_step("on")
    steady = slice(4, None)  # the first passes grow the heap in both modes
    # glibc's default: every pass maps its large tensors afresh and faults them in again
    assert min(default[steady]) > tensor_pages
    # kept: the heap's blocks are reused, so most passes fault in nothing new. The heap still
    # grows now and then by a tensor or three when a block lands elsewhere (in CI once: 4 of
    # 12 steady passes, back to back), and never shrinks, so the growth is finite: the check
    # is on the median pass, which any pass-by-pass faulting would put above a whole tensor.
    median = sorted(kept[steady])[len(kept[steady]) // 2]
    assert median < tensor_pages // 10, f"kept {kept}; default {default}"


def test_returns_a_bool_and_can_be_called_twice():
    assert host_memory.keep_freed_memory() is host_memory.keep_freed_memory()


# peak RSS of a small "stage" measured after a 512 MB one freed its memory, as a cell that
# trains a shared stage first measures its own (printed by a fresh process, memory kept on)
PEAK_PROBE = """
import sys, torch
from harness import host_memory
from harness.hardware import PeakMemory
from harness.metrics import StepTiming
assert host_memory.keep_freed_memory()
earlier = torch.ones(128 * 2**20)  # 512 MB, freed: the heap keeps it
del earlier
if sys.argv[1] == "trainer":  # the peak a run's timing takes, from its start
    timing = StepTiming(torch.device("cpu"))
    timing.__enter__()
    peak = timing.peak
else:
    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
small = torch.ones(2**20)  # 4 MB
print(peak.held_mb(), peak.peak_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim, VmHWM")
def test_a_runs_peak_leaves_out_memory_freed_before_it_started():
    def held_and_peak(mode: str) -> tuple[float, float]:
        done = subprocess.run([sys.executable, "-c", PEAK_PROBE, mode], cwd=REPO,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        held, peak = (float(x) for x in done.stdout.split())
        return held, peak

    _, kept = held_and_peak("plain")  # the freed 512 MB stay resident and in the peak (what
    # bench/ wants between its warm-up and timed steps)
    held, peak = held_and_peak("trainer")
    assert kept > peak + 400
    assert peak < held + 100  # a run's own peak: what the process holds and the 4 MB
