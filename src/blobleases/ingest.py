"""Reading a store_file source, once for every backend and ContentId.for_file.

A source is a path or a binary file object. :func:`open_source` opens a
path (and closes it after) or passes a file object through; :func:`chunks`
reads it in chunks of at most 1 MiB, in constant memory; :func:`copy`
hashes every chunk while handing it to a writer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, Final

from .errors import StorageError

__all__ = ["CHUNK", "cannot_read", "chunks", "copy", "open_source"]

#: Bytes read at a time.
CHUNK: Final = 1 << 20


def _cannot_open(path: str, exc: OSError) -> Exception:
    return exc


def cannot_read(path: str, exc: OSError) -> StorageError:
    """The error of a source path that cannot be opened (for ``open_source``)."""
    return StorageError(f"cannot read {path!r}: {exc.strerror}")


@contextmanager
def open_source(
    source: str | os.PathLike[str] | IO[bytes],
    cannot_open: Callable[[str, OSError], Exception] = _cannot_open,
) -> Iterator[IO[bytes]]:
    """The source as a binary file: a path opened for reading (closed on
    exit), or the file object itself (left open). ``cannot_open(path, exc)``
    gives the error raised when the path cannot be opened."""
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise cannot_open(os.fspath(source), exc) from exc
        with f:
            yield f
    else:
        yield source


def chunks(
    f: Any,
    size: int = CHUNK,
    limit: int | None = None,
    cannot_read: Callable[[OSError], Exception] | None = None,
) -> Iterator[memoryview]:
    """Read ``f`` to its end (or ``limit`` bytes) in chunks of at most ``size``.

    A file with ``readinto`` is read into one reused buffer, so a chunk is
    valid only until the next is read (copy it to keep it). TypeError when
    ``read()`` returns text; ``cannot_read(exc)``, when given, is the error
    raised for an OSError from the source."""
    buf = memoryview(bytearray(size)) if hasattr(f, "readinto") else None
    left = limit
    while left is None or left > 0:
        want = size if left is None else min(size, left)
        try:
            if buf is not None:
                n = f.readinto(buf[:want])
            else:
                raw = f.read(want)
        except OSError as exc:
            if cannot_read is None:
                raise
            raise cannot_read(exc) from exc
        if buf is not None:
            if not n:
                return
            chunk = buf[:n]
        else:
            if not raw:
                return
            if isinstance(raw, str):
                raise TypeError("source must be a binary file (its read() returned text)")
            chunk = memoryview(raw)
        if left is not None:
            left -= chunk.nbytes
        yield chunk


def copy(
    f: Any,
    hasher: Any,
    write: Callable[[memoryview], object] | None = None,
    cannot_read: Callable[[OSError], Exception] | None = None,
) -> int:
    """Hash ``f`` to its end while handing each chunk to ``write``; the size."""
    total = 0
    for chunk in chunks(f, cannot_read=cannot_read):
        hasher.update(chunk)
        if write is not None:
            write(chunk)
        total += chunk.nbytes
    return total
