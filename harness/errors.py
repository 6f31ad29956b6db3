"""User-facing errors: one clear line naming the file, key or value, and exit code 2.

Every mistake a user can make (and every problem of their machine the run cannot mend: a
read-only folder, a full disk) ends as ``error: <message>`` on stderr. The classes are the
leaves of one hierarchy under ``UserError``; this module imports nothing of the project, so
every layer may raise them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem the user must fix; the message names the file, key or value."""


class ConfigError(UserError):
    """A mistake in a config file, a binding or a command-line value."""


class DataError(UserError):
    """A dataset or manifest problem, with the file and the reason."""


class ModelError(UserError):
    """An unknown model name or an unusable model config."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run."""


class UnknownMethodError(UserError):
    """A method name that is not registered."""


class NonFiniteEmbeddings(UserError):
    """The model gives NaN or inf embeddings: no metric over them means anything.

    The model's fault rather than the user's, but best said in one line too. A NaN compares
    false with everything, so unchecked it would rank every query first (100% recall) or crash
    deep in the ranking or the probe with a message about something else. It happens when
    training diverged in its last steps, after the trainer's last loss check.
    """


def naming(error: OSError, path: object) -> OSError:
    """``error`` as an OSError of the same kind that names ``path`` (the file the user knows,
    not a temporary one beside it); one without an errno stays as it is."""
    if error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, str(path))


def os_error_message(error: OSError) -> str:
    """'PATH: reason' for an OSError that names its file ('[Errno 28] ...' made readable)."""
    where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    return f"{where}: {error.strerror or error}"


def message(error: BaseException) -> str:
    """The one line a user sees for ``error``."""
    if isinstance(error, OSError) and error.filename is not None:
        return os_error_message(error)
    # gin appends "In call to configurable ..." to errors raised inside a configurable
    return str(error).split("\n  In call to configurable")[0]


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Turn a user error, or an OSError that names its file, into ``error: <message>`` on
    stderr and exit code 2; anything else (a bug) propagates with its traceback."""
    try:
        yield
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and e.filename is None:
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
