"""Blob chunks on the server: writing a blob in pieces, and reading byte
ranges back that are never bytes of another layout.

A blob of ``size`` bytes stored under upload token ``token`` is ``chunks``
keys ``P:{cid}:chunk:<i>`` of ``chunk_size`` bytes (the last one shorter).
When a blob is lost and the same content stored again, possibly with another
chunk size, the chunk keys are reused: a range read therefore reads the
meta's upload token with the chunks, in one MULTI, and raises LeaseExpired
when the token is no longer the one the reader opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import redis.exceptions

from ..content_id import ContentId
from ..errors import IntegrityError, LeaseExpired
from .keys import Keys, Meta
from .keys import text as _s

__all__ = ["chunk_lost", "fetch_parts", "joined", "layout_gone", "memory_chunks"]

_PIPE_BYTES = 16 << 20  # bytes fetched per pipelined batch of chunk reads


def joined(parts: list[bytes]) -> bytes:
    """The parts as one bytes object (the part itself when there is one)."""
    return parts[0] if len(parts) == 1 else b"".join(parts)


def fetch_parts(
    client: Any,
    keys: Keys,
    cid: ContentId,
    token: str,
    cs: int,
    size: int,
    offset: int,
    length: int,
) -> list[bytes]:
    """Bytes [offset, offset+length) of the blob stored under upload
    ``token``, in parts, fetching only the chunks that hold them. Never
    bytes of another layout: LeaseExpired when that blob is gone (deleted,
    lost by the server, or stored again since, with any chunk size),
    IntegrityError when one of its chunks is missing or short."""
    end = min(offset + length, size)
    if end <= offset:
        return [b""]
    base = keys.content(cid)
    first, last = offset // cs, (end - 1) // cs
    parts: list[bytes] = []
    i = first
    while i <= last:
        j = min(last + 1, i + max(1, _PIPE_BYTES // cs))
        ranges = []
        for k in range(i, j):
            lo = max(offset, k * cs) - k * cs
            hi = min(end, (k + 1) * cs) - k * cs
            ranges.append((k, lo, hi))
        try:
            *got, current = read_chunks(client, base, cs, size, ranges, atomic=True)
        except redis.exceptions.OutOfMemoryError:
            # A server at maxmemory refuses every command queued in a
            # MULTI. Read in a plain pipeline: the token is read after the
            # chunks on the same connection, and a token is never current
            # twice, so if it is still this blob's the chunks were too.
            *got, current = read_chunks(client, base, cs, size, ranges, atomic=False)
        if current is None or _s(current) != token:
            raise layout_gone(cid)
        for (k, lo, hi), piece in zip(ranges, got, strict=True):
            if piece is None or len(piece) != hi - lo:
                raise IntegrityError(f"chunk {k} of {cid} is missing or has the wrong size")
            parts.append(piece)
        i = j
    return parts


def read_chunks(
    client: Any, base: str, cs: int, size: int, ranges: list[tuple[int, int, int]], *, atomic: bool
) -> list[Any]:
    """The byte ranges (chunk, lo, hi) of chunks under ``base``, then the
    meta's upload token, read in one MULTI when ``atomic``: the chunks read
    are those of the blob with that token (chunk keys are reused when the
    same content is stored again, with any chunk size)."""
    pipe = client.pipeline(transaction=atomic)
    for k, lo, hi in ranges:
        if lo == 0 and hi == min(cs, size - k * cs):
            pipe.get(f"{base}chunk:{k}")
        else:
            pipe.getrange(f"{base}chunk:{k}", lo, hi - 1)
    pipe.hget(base + "meta", Meta.UPLOAD)
    return list(pipe.execute())


def layout_gone(cid: ContentId) -> LeaseExpired:
    return LeaseExpired(
        f"content {cid} is gone from the server (deleted, lost or stored again "
        "since it was opened): its hold was lost",
        content_id=cid,
    )


def chunk_lost(client: Any, keys: Keys, cid: ContentId, token: str, index: int) -> NoReturn:
    current = client.hget(keys.meta(cid), Meta.UPLOAD)
    if current is None or _s(current) != token:
        raise layout_gone(cid)
    raise IntegrityError(f"chunk {index} of {cid} is missing or has the wrong size")


def memory_chunks(data: memoryview, size: int) -> Iterator[memoryview]:
    for off in range(0, len(data), size):
        yield data[off : off + size]
