"""User-facing errors: one clear line naming the file, key or value, and exit code 2."""

from __future__ import annotations

import contextlib
import sys

from harness.checkpoint import CheckpointError
from harness.config import ConfigError
from harness.evaluate import NonFiniteEmbeddings
from harness.manifest import DataError
from harness.models import ModelError
from methods import UnknownMethodError

# NonFiniteEmbeddings is the model's fault, not the user's, but it too is best said in one line
USER_ERRORS = (
    ConfigError,
    DataError,
    ModelError,
    UnknownMethodError,
    CheckpointError,
    NonFiniteEmbeddings,
)
EXIT_USER_ERROR = 2


@contextlib.contextmanager
def report_errors():
    """Turn a user error into ``error: <message>`` on stderr and exit code 2; crashes propagate."""
    try:
        yield
    except USER_ERRORS as e:
        # gin appends "In call to configurable ..." to errors raised inside a configurable
        message = str(e).split("\n  In call to configurable")[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
