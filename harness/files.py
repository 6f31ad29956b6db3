"""Files written so that a crash never leaves half of one, and read so that a missing or torn one
is just absent. Every OSError names the file the user knows, not a temporary one beside it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from harness.errors import naming


@contextlib.contextmanager
def replaced_atomically(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file beside ``path`` that replaces it, fsynced, when the block ends; after an error
    (a crash, a full disk) it is removed and ``path`` is as it was: a reader sees the old file
    or the new one, never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise naming(e, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)  # a full disk gets its space back
        if isinstance(e, OSError):
            raise naming(e, path) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with replaced_atomically(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def writable_dir(path: str | Path) -> Path:
    """Make the folder ``path`` if needed and check that a file can be written in it, before
    any work is done there; an OSError names the folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
    except OSError as e:
        raise naming(e, path) from None
    os.close(fd)
    os.unlink(probe)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
