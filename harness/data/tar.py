"""Reading a shard: the members of a tar archive, sliced from a memory map."""

from __future__ import annotations

import mmap
import re
import tarfile
from collections.abc import Iterator
from typing import Any

WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does


class PlainUstarMembers:
    """(name, data offset, size) of the leading plain members of a tar archive in ``data``.

    Python's tarfile parses every header field in Python: 37 us per sample (two members) on the
    built-in shards on a 2-core CPU, against 8 us here, where only name, size, type and checksum
    are read. Only the simplest case is handled: a POSIX or GNU ustar header of a regular file
    with an octal size and a valid unsigned checksum. Iteration stops at the first header that
    is anything else, leaving ``offset`` at it for tarfile to carry on from, or with ``at_end``
    set at the zero block that ends an archive.
    """

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data, self.offset, self.at_end = data, 0, False

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        block = tarfile.BLOCKSIZE
        while True:
            header = self.data[self.offset : self.offset + block]
            if len(header) < block:
                return
            if header.count(0) == block:
                self.at_end = True
                return
            member = _plain_header(header)
            if member is None:
                return
            name, size = member
            yield name, self.offset + block, size
            self.offset += block + -(-size // block) * block


_POSIX_MAGIC, _GNU_MAGIC = b"ustar\x0000", b"ustar  \x00"


def _plain_header(header: bytes) -> tuple[str, int] | None:
    """Name and size of a plain regular-file ustar header, or None for anything else."""
    magic = header[257:265]
    if header[156:157] not in (b"0", b"\0") or magic not in (_POSIX_MAGIC, _GNU_MAGIC):
        return None
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256 numbers, garbage
        return None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # its own field as spaces
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if magic == _POSIX_MAGIC else b""
    if prefix:
        name = prefix + b"/" + name
    if not name or name.endswith(b"/"):  # an old-style directory
        return None
    return name.decode("utf-8", "surrogateescape"), size


def member_spans(file: Any, data: mmap.mmap, url: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of the tar archive open as ``file`` and
    mapped as ``data``: plain ustar members first, then tarfile from the first other header."""
    plain = PlainUstarMembers(data)
    yield from plain
    if plain.at_end:
        return
    file.seek(plain.offset)  # tarfile counts offsets from where the file stands
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, member.offset_data, member.size
        # tarfile stops quietly at a cut or garbled header; a whole archive ends in zeros
        end_block = data[tar.offset : tar.offset + tarfile.BLOCKSIZE]
        if len(end_block) < tarfile.BLOCKSIZE or any(end_block):
            raise tarfile.ReadError(f"{url} is cut or garbled at byte {tar.offset}")


def shard_members(url: str) -> Iterator[dict[str, Any]]:
    """The regular files of one shard, in order, as webdataset's ``group_by_keys`` takes them.

    Each member's bytes are sliced from a memory map. Plain ustar members (what webdataset's
    ``TarWriter`` and Python's tarfile write for short names) have their headers read by
    ``PlainUstarMembers``; from the first header that is anything else (pax or GNU
    extensions, a directory, damage) tarfile's random-access reader takes over. Damage raises
    (tarfile.TarError, EOFError, OSError; ValueError for an empty file) where it is met.
    """
    with open(url, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, start, size in member_spans(file, data, url):
            if not WDS_META.match(name):  # a cut member comes out short: undecodable
                yield {"fname": name, "data": data[start : start + size], "__url__": url}
