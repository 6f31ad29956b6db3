"""Fixtures of the micro-benchmarks (``pytest bench/``): a clean gin state per benchmark."""

from __future__ import annotations

import gin
import pytest


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
