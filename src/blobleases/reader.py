"""BlobReader: a read-only, seekable binary file over one blob.

A reader is a *hold*: the storage keeps the blob's bytes until the reader is
closed (or garbage-collected, or its process is reaped), even if the lease it
was opened through is dropped.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["BlobReader", "BufferSource", "RangeSource", "ReaderSource"]


class ReaderSource(Protocol):
    """Where a reader's bytes come from. Backends supply one per reader."""

    def buffer(self) -> memoryview | None:
        """The whole blob as a read-only view without copying, or None if the
        backend cannot map it (then readers use :meth:`read_range`)."""

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes (fewer only at the end) starting at ``offset``."""

    def close(self) -> None:
        """Release what the source holds (maps, files, connections)."""


class BufferSource:
    """A source over a buffer the backend already holds (bytes or mmap)."""

    def __init__(self, buffer: memoryview, on_close: Callable[[], None] | None = None) -> None:
        self._view = buffer.toreadonly()
        self._on_close = on_close

    def buffer(self) -> memoryview:
        return self._view

    def read_range(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset : offset + length])

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class RangeSource:
    """A source that fetches ranges through a callable (e.g. a network backend)."""

    def __init__(
        self,
        fetch: Callable[[int, int], bytes],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._on_close = on_close

    def buffer(self) -> memoryview | None:
        return None

    def read_range(self, offset: int, length: int) -> bytes:
        return self._fetch(offset, length)

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class BlobReader(io.BufferedIOBase):
    """Reads one blob: ``read``, ``read1``, ``readinto``, ``peek``, ``seek``,
    ``tell`` and :meth:`getbuffer`; ``.size`` is the blob's length.

    Closing releases the reader's hold on the blob (exactly once, and only in
    the process that opened it: a forked child's copy never releases the
    parent's hold).
    """

    def __init__(
        self, source: ReaderSource, size: int, release: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self._source = source
        self._size = size
        self._pos = 0
        self._release = release
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._view = source.buffer()
        self._whole: memoryview | None = None

    @property
    def size(self) -> int:
        """The blob's length in bytes."""
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed blob reader")

    def tell(self) -> int:
        self._check()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check()
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"whence must be 0, 1 or 2, not {whence!r}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _take(self, size: int | None) -> bytes:
        self._check()
        if size is None or size < 0:
            size = max(self._size - self._pos, 0)
        start = self._pos
        end = min(start + size, self._size)
        if end <= start:
            return b""
        if self._view is not None:
            data = bytes(self._view[start:end])
        else:
            data = self._source.read_range(start, end - start)
        self._pos = start + len(data)
        return data

    def read(self, size: int | None = -1, /) -> bytes:
        return self._take(size)

    def read1(self, size: int = -1, /) -> bytes:
        return self._take(size)

    def readinto(self, buffer: object, /) -> int:
        self._check()
        target = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        start = self._pos
        end = min(start + len(target), self._size)
        if end <= start:
            return 0
        n = end - start
        if self._view is not None:
            target[:n] = self._view[start:end]
        else:
            chunk = self._source.read_range(start, n)
            n = len(chunk)
            target[:n] = chunk
        self._pos = start + n
        return n

    def readinto1(self, buffer: object, /) -> int:
        return self.readinto(buffer)

    def peek(self, size: int = 0, /) -> bytes:
        self._check()
        pos = self._pos
        data = self._take(size if size > 0 else 8192)
        self._pos = pos
        return data

    def getbuffer(self) -> memoryview:
        """The whole blob as a read-only memoryview: zero-copy where the
        backend maps the blob (memory, files), else one copy. The view stays
        valid while it is referenced; the reader's hold lasts until close."""
        self._check()
        if self._view is not None:
            return self._view
        if self._whole is None:
            self._whole = memoryview(self._source.read_range(0, self._size)).toreadonly()
        return self._whole

    def detach(self) -> io.RawIOBase:
        raise io.UnsupportedOperation("a blob reader has no raw stream to detach")

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            super().close()
            self._view = None
            self._whole = None
            if os.getpid() != self._owner_pid:
                return
            try:
                self._source.close()
            finally:
                release, self._release = self._release, None
                if release is not None:
                    release()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._pos}"
        return f"<BlobReader size={self._size} {state}>"
