"""Shared fixtures: a tiny built-in dataset, a micro model, and a clean gin state per test."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gin
import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PYTHONHASHSEED", "0")
# per-machine measurements (the CPU's matmul peak) go to a folder of this test session's
os.environ.setdefault("CLIPBENCH_CACHE", tempfile.mkdtemp(prefix="clipbench-cache-"))


@pytest.fixture(autouse=True)
def clean_gin():
    """gin's config is global: every test starts and ends with an empty one."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small built-in dataset (8 train shards so 2 ranks x 2 workers all get some)."""
    from data_tools.builtin import BuiltinSpec, build

    spec = BuiltinSpec(
        num_train=400, num_test=60, shard_size=50, test_captions=3, image_size=32, seed=1
    )
    return build(spec, tmp_path_factory.mktemp("data") / "tiny", workers=1, verbose=False)


@pytest.fixture(scope="session")
def micro_cfg() -> dict:
    from harness.models import model_config

    return model_config("micro-vit")


@pytest.fixture(scope="session")
def method_bindings(tmp_path_factory, micro_cfg):
    """name -> the gin bindings that let that method run one step on its own (e.g. a teacher)."""
    import methods

    workdir = tmp_path_factory.mktemp("method-inputs")

    def bindings(name: str, variant: str | None = None) -> list[str]:
        cls = methods.method_class(name)
        return cls.example_bindings(workdir, micro_cfg, variant or cls.example_variants[0])

    return bindings


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the repository root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
