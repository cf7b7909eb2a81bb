"""Storing a file whose content id must be known before its first byte is
written (the id is the key: an S3 object, Redis chunks in the content's
hash slot), for every backend that does (PostgresStorage, RedisStorage).

:func:`seekable_source` gives the source as a seekable file (a pipe or
socket is spooled to a private temporary file first); :func:`identify`
hashes it from its position (the first pass); a :class:`Reread` reads the
same bytes again in chunks while hashing them (the second pass, as the
upload consumes them) and :meth:`Reread.check` raises IntegrityError if
they were not the bytes the first pass saw: a file that changed in between
is never stored under the id of other bytes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

from . import ingest
from .content_id import ContentId, new_hasher
from .errors import IntegrityError

__all__ = ["Reread", "identify", "seekable_source"]


@contextlib.contextmanager
def seekable_source(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[IO[bytes]]:
    """The source (a path, opened and closed here, or a binary file object)
    as a seekable file from its current position: the file itself if it
    can seek, else its bytes spooled to a temporary file (removed on exit)."""
    with ingest.open_source(source, ingest.cannot_read) as f:
        seekable = False
        with contextlib.suppress(AttributeError, OSError, ValueError):
            seekable = bool(f.seekable())
        if seekable:
            yield f
            return
        with tempfile.TemporaryFile() as spool:
            for part in ingest.chunks(f):
                spool.write(part)
            spool.seek(0)
            yield spool


def identify(f: IO[bytes], algorithm: str) -> tuple[int, ContentId, int]:
    """Hash a seekable file from its position to its end: (that position,
    the content id, the size)."""
    start = f.tell()
    hasher = new_hasher(algorithm)
    size = ingest.copy(f, hasher)
    return start, ContentId(algorithm, hasher.digest()), size


class Reread:
    """The ``size`` bytes of ``f`` from ``start`` again, in chunks of at most
    ``chunk`` bytes, hashed as they are read. Each iteration starts over
    (an upload may be retried); :meth:`check` judges the last one."""

    __slots__ = ("chunk", "cid", "f", "hasher", "seen", "size", "start")

    def __init__(
        self, f: IO[bytes], start: int, size: int, cid: ContentId, chunk: int = ingest.CHUNK
    ) -> None:
        self.f, self.start, self.size, self.cid, self.chunk = f, start, size, cid, chunk
        self.hasher = new_hasher(cid.algorithm)
        self.seen = 0

    def __iter__(self) -> Iterator[bytes]:
        self.f.seek(self.start)
        self.hasher = new_hasher(self.cid.algorithm)
        self.seen = 0
        while self.seen < self.size:
            part = self.f.read(min(self.chunk, self.size - self.seen))
            if not part:
                break
            self.hasher.update(part)
            self.seen += len(part)
            yield bytes(part)

    def check(self) -> None:
        """IntegrityError unless the last pass read ``size`` bytes that hash
        to the content id."""
        if self.seen != self.size or self.hasher.digest() != self.cid.digest:
            raise IntegrityError("the file changed while it was being stored")
