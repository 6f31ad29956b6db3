"""Fixtures of the micro-benchmarks (``pytest bench/``): a clean gin state per benchmark, and
CPU memory kept as training keeps it (``harness.host_memory``), so large tensors are timed
without the page faults a training step does not pay."""

from __future__ import annotations

import gin
import pytest

from harness import host_memory


@pytest.fixture(scope="session", autouse=True)
def memory_as_in_training():
    host_memory.keep_freed_memory()


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
