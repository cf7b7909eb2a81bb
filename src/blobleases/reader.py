"""BlobReader: a read-only, seekable binary file over one blob.

A reader is a *hold*: the storage keeps the blob's bytes until the reader is
closed (or garbage-collected, or its process is reaped), even if the lease it
was opened through is dropped, and after that for as long as any view from
:meth:`BlobReader.getbuffer` lives (a memoryview, a slice of it, a numpy
array over it).

How a view keeps the hold (Python 3.11 has no ``__buffer__``, so no Python
object can export a buffer of its own): every view is exported by one
*exporter* object made for this reader alone, and a ``weakref.finalize`` on
that exporter ends the hold when the last view (and the reader) let go of it.
Directory readers export from their own ``mmap``; a blob a backend holds as
``bytes`` is exported by a ctypes array over those bytes (no copy, about
0.5 us per reader) that keeps them alive; a backend that fetches ranges (or
any other buffer) is copied once into an anonymous ``mmap`` on the first
``getbuffer``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import itertools
import mmap
import operator
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

from . import gil_free
from .errors import IntegrityError

__all__ = ["BlobReader", "BufferSource", "RangeSource", "ReaderSource"]

#: How much ``peek`` returns at least, and the block a range reader caches
#: and line iteration splits at once.
_PEEK = 8192
_BLOCK = 1 << 16
#: Range readers fetch at least this much at once for small reads and lines.
_RANGE_BLOCK = 1 << 18
_COPY_CHUNK = 1 << 18
_NEWLINE = re.compile(b"\n")


class ReaderSource(Protocol):
    """Where a reader's bytes come from. Backends supply one per reader."""

    def buffer(self) -> memoryview | None:
        """The whole blob as a read-only view without copying, or None if the
        backend cannot map it (then readers use :meth:`read_range`).

        The view's exporter (``view.obj``) must be an object made for this
        reader alone that supports weak references (an ``mmap``, say), or
        ``bytes``: the reader's hold lasts while the exporter lives. Any
        other exporter is copied once when a view is asked for."""

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes (fewer only at the end) starting at ``offset``."""

    def close(self) -> None:
        """Release what the source holds (maps, files, connections). Views the
        reader exported stay valid: they keep their exporter alive."""


class BufferSource:
    """A source over a buffer the backend already holds (bytes or mmap)."""

    def __init__(self, buffer: memoryview, on_close: Callable[[], None] | None = None) -> None:
        self._view: memoryview | None = buffer.toreadonly()
        self._on_close = on_close

    def buffer(self) -> memoryview | None:
        return self._view

    def read_range(self, offset: int, length: int) -> bytes:
        view = self._view
        if view is None:
            raise ValueError("I/O operation on closed blob reader")
        return bytes(view[offset : offset + length])

    def close(self) -> None:
        self._view = None
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


class _Pid:
    """This process's pid, kept current across fork without a system call
    on every reader."""

    def __init__(self) -> None:
        self.value = os.getpid()
        os.register_at_fork(after_in_child=self.forked)

    def forked(self) -> None:
        self.value = os.getpid()


_PID = _Pid()


class _Hold:
    """A reader's hold on its blob: ended (``release`` called, once) when the
    reader is closed and every exporter of its views is gone. Only the
    process that opened the reader ends it: a forked child's copies of the
    reader and its views never end the parent's hold."""

    __slots__ = ("_count", "_lock", "_release", "pid")

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._count = 1  # the open reader
        self._lock = threading.Lock()
        self.pid = _PID.value
        self._release = release

    def keep(self, exporter: object) -> None:
        """Hold on until ``exporter`` is garbage-collected."""
        with self._lock:
            self._count += 1
        ref = _ExporterRef(exporter, _exporter_gone)
        ref.hold = self
        _EXPORTERS[id(ref)] = ref

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count:
                return
            release, self._release = self._release, None
        if release is not None and _PID.value == self.pid:
            release()


class _ExporterRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to an exporter that ends its share of a hold."""

    __slots__ = ("hold",)
    hold: _Hold


#: The live exporters' references by id (a weakref's callback runs only
#: while the weakref lives; weakrefs hash as their referent, which may not
#: hash). A plain weakref costs 0.1 us, weakref.finalize 2 us.
_EXPORTERS: dict[int, _ExporterRef] = {}


def _exporter_gone(ref: _ExporterRef) -> None:
    _EXPORTERS.pop(id(ref), None)
    ref.hold.drop()


def _bytes_exporter(data: bytes) -> memoryview:
    """A read-only view of ``data`` whose exporter is a new ctypes array over
    the same memory (no copy) that keeps ``data`` alive."""
    address = ctypes.c_void_p.from_buffer(ctypes.c_char_p(data)).value or 0
    exporter = (ctypes.c_ubyte * len(data)).from_address(address)
    exporter._owner = data  # type: ignore[attr-defined]
    return memoryview(exporter).cast("B").toreadonly()


def _closed_next() -> bytes:
    """A closed reader's ``__next__``."""
    raise ValueError("I/O operation on closed blob reader")


def _line_blocks(ref: weakref.ref[BlobReader]) -> Iterator[io.BytesIO]:
    """The lines of a reader's successive blocks (BytesIO), from its position
    at each step, until the end of the blob. The reader is held weakly: its
    ``__next__`` (a chain over this generator) must not keep it alive."""
    while True:
        reader = ref()
        if reader is None:
            return
        block = reader._next_block()
        if block is None:
            # A chain ends for good at its end: the next call starts a new
            # one, from wherever the reader is then (after a seek, say).
            reader.__next__ = _line_stream(ref)  # type: ignore[method-assign]
            return
        del reader
        yield block


def _line_stream(ref: weakref.ref[BlobReader]) -> Callable[[], bytes]:
    return itertools.chain.from_iterable(_line_blocks(ref)).__next__


def _supports_weakref(obj: object) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def unpicklable(reader: object, send: str) -> TypeError:
    """The error pickling a reader raises: ``send`` says how to send its lease."""
    return TypeError(
        f"a{'n' if type(reader).__name__[0] in 'AEIOU' else ''} {type(reader).__name__} "
        f"cannot be pickled: send its lease instead ({send}, and open a reader in the receiver)"
    )


def describe(reader: object, size: int, pos: int | None) -> str:
    """A reader's repr: its size and position (None once closed)."""
    state = "closed" if pos is None else f"pos={pos}"
    return f"<{type(reader).__name__} size={size} {state}>"


class BlobReader(io.BufferedIOBase):
    """Reads one blob as ``open(path, "rb")`` would: ``read``, ``read1``,
    ``readinto``, ``peek``, ``readline``, ``readlines``, line iteration,
    ``seek``, ``tell``, and :meth:`getbuffer`; ``.size`` is the blob's length.

    Where a file and ``io.BytesIO`` differ it behaves as the file: seeking
    before the start raises OSError (EINVAL); every method of a closed
    reader raises ValueError. Offsets and sizes accept any integer with
    ``__index__``. A reader cannot be pickled: send its lease.

    The reader's hold on the blob ends exactly once, when it is closed (or
    garbage-collected) and every view from :meth:`getbuffer` is released.
    """

    # Line iteration runs in C: ``__next__`` is a slot holding the
    # ``__next__`` of an itertools.chain over successive blocks of whole
    # lines, each a BytesIO (a slot is read without running Python code,
    # and ``iter(reader)`` stays the reader itself, as for files).
    __slots__ = ("__next__",)

    def __init__(
        self, source: ReaderSource, size: int, release: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self._source = source
        self._size = size
        self._pos = 0
        self._lock = threading.Lock()
        self._hold = _Hold(release)
        # The whole lines of the block read last for lines (from _base to
        # _pos), as a BytesIO sharing its bytes (None when there is none):
        # line reads take its lines (C code), and the position is _base
        # plus its position.
        self._lines: io.BytesIO | None = None
        self._base = 0
        self.__next__ = _line_stream(weakref.ref(self))  # type: ignore[method-assign]
        # A range reader's cached block: its bytes and where they start.
        self._block = b""
        self._block_start = 0
        self._view: memoryview | None = None
        # The blob as the bytes object a backend holds it in, if it does.
        self._whole_bytes: bytes | None = None
        view = source.buffer()
        if view is not None:
            if type(view.obj) is bytes:
                self._whole_bytes = view.obj if view.nbytes == len(view.obj) else None
                view = None if self._whole_bytes is None else _bytes_exporter(view.obj)
            elif not _supports_weakref(view.obj):
                view = None
            if view is not None:
                self._hold.keep(view.obj)
                self._view = view
        # The whole blob for getbuffer() when the source has no usable view.
        self._whole: memoryview | None = None

    @property
    def size(self) -> int:
        """The blob's length in bytes."""
        return self._size

    def _closed_error(self) -> NoReturn:
        raise ValueError("I/O operation on closed blob reader")

    def readable(self) -> bool:
        if self.closed:
            self._closed_error()
        return True

    def seekable(self) -> bool:
        if self.closed:
            self._closed_error()
        return True

    def writable(self) -> bool:
        if self.closed:
            self._closed_error()
        return False

    def tell(self) -> int:
        if self.closed:
            self._closed_error()
        lines = self._lines
        return self._pos if lines is None else self._base + lines.tell()

    def _settle(self) -> None:
        """Drop the lines split ahead, making _pos the position. Their
        BytesIO is moved to its end: a line iteration holding it goes on
        from the position."""
        lines = self._lines
        if lines is not None:
            self._pos = self._base + lines.tell()
            lines.seek(0, io.SEEK_END)
            self._lines = None

    def seek(self, offset: Any, whence: Any = io.SEEK_SET) -> int:
        if self.closed:
            self._closed_error()
        self._settle()
        delta, how = operator.index(offset), operator.index(whence)
        if how == io.SEEK_SET:
            pos = delta
        elif how == io.SEEK_CUR:
            pos = self._pos + delta
        elif how == io.SEEK_END:
            pos = self._size + delta
        else:
            raise ValueError(f"invalid whence ({how}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: seek to {pos}")
        self._pos = pos
        return pos

    def _count(self, size: Any) -> int:
        """How many bytes a read of ``size`` gets from the position."""
        left = max(self._size - self._pos, 0)
        if size is None:
            return left
        size = operator.index(size)
        return left if size < 0 else min(size, left)

    def _bytes(self, start: int, end: int, ahead: bool = False) -> bytes:
        """The blob's bytes ``start:end`` (within the blob). A range reader
        serves them from its cached block if there, else fetches exactly
        them, or with ``ahead`` (lines, peek) a block from ``start``."""
        if end <= start:
            return b""
        view = self._view
        if view is not None:
            if end - start < gil_free.MIN_LENGTH:
                return view[start:end].tobytes()
            whole = self._whole_bytes
            if whole is not None and end - start == len(whole):
                return whole  # immutable: the backend's own bytes, not a copy
            return gil_free.to_bytes(view[start:end])  # without stalling other threads
        block_start = self._block_start
        if start >= block_start and end <= block_start + len(self._block):
            return self._block[start - block_start : end - block_start]
        if not ahead or end - start >= _RANGE_BLOCK:
            return self._source.read_range(start, end - start)
        self._block = self._source.read_range(start, _RANGE_BLOCK)
        self._block_start = start
        return self._block[: end - start]

    def read(self, size: Any = -1, /) -> bytes:
        if self.closed:
            self._closed_error()
        self._settle()
        start = self._pos
        data = self._bytes(start, start + self._count(size))
        self._pos = start + len(data)
        return data

    def read1(self, size: Any = -1, /) -> bytes:
        return self.read(size)

    def readinto(self, buffer: Any, /) -> int:
        if self.closed:
            self._closed_error()
        target = memoryview(buffer).cast("B")
        self._settle()
        start = self._pos
        n = self._count(len(target))
        if n <= 0:
            return 0
        if self._view is not None:
            if n < gil_free.MIN_LENGTH:
                target[:n] = self._view[start : start + n]
            else:
                gil_free.copy_into(target[:n], self._view[start : start + n])
        else:
            chunk = self._bytes(start, start + n)
            n = len(chunk)
            target[:n] = chunk
        self._pos = start + n
        return n

    def readinto1(self, buffer: Any, /) -> int:
        return self.readinto(buffer)

    def peek(self, size: Any = 0, /) -> bytes:
        """At least one byte from the position unless at the end (usually up
        to 8 KiB or ``size``), without moving it."""
        if self.closed:
            self._closed_error()
        self._settle()
        start = self._pos
        end = min(start + max(operator.index(size), _PEEK), self._size)
        if self._view is None:
            block_end = self._block_start + len(self._block)
            if self._block_start <= start < block_end:
                end = max(end, min(block_end, self._size))
        return self._bytes(start, end, ahead=True)

    def _find_newline(self, start: int, end: int) -> int:
        """The offset just past the first newline in ``start:end``, or ``end``."""
        view = self._view
        if view is not None:
            found = _NEWLINE.search(view, start, end)
            return end if found is None else int(found.end())
        pos = start
        while pos < end:
            chunk_end = min(pos + _RANGE_BLOCK, end)
            found_at = self._bytes(pos, chunk_end, ahead=True).find(b"\n")
            if found_at >= 0:
                return pos + found_at + 1
            pos = chunk_end
        return end

    def readline(self, size: Any = -1, /) -> bytes:
        if self.closed:
            self._closed_error()
        limit = -1 if size is None else operator.index(size)
        if limit < 0:
            lines = self._lines
            if lines is not None:
                line = lines.readline()
                if line:
                    return line
            lines = self._next_block()
            return b"" if lines is None else lines.readline()
        self._settle()
        start = self._pos
        end = self._find_newline(start, start + self._count(limit))
        line = self._bytes(start, end, ahead=True)
        self._pos = start + len(line)
        return line

    def _next_block(self) -> io.BytesIO | None:
        """The whole lines of the next block (at least one line) as
        ``_lines`` (None at the end)."""
        if self.closed:
            self._closed_error()
        self._settle()
        start = self._pos
        if start >= self._size:
            return None
        end = min(start + _BLOCK, self._size)
        block = self._bytes(start, end, ahead=True)
        if end < self._size:  # split whole lines only
            cut = block.rfind(b"\n") + 1
            if not cut:
                block = self._bytes(start, self._find_newline(start, self._size), ahead=True)
            elif cut < len(block):
                block = block[:cut]
        self._base = start
        self._pos = start + len(block)
        lines = self._lines = io.BytesIO(block)
        return lines

    def __iter__(self) -> BlobReader:
        if self.closed:
            self._closed_error()
        return self

    def readlines(self, hint: Any = -1, /) -> list[bytes]:
        if self.closed:
            self._closed_error()
        limit = -1 if hint is None else operator.index(hint)
        if limit > 0:
            lines: list[bytes] = []
            total = 0
            while total <= limit:
                line = self.readline()
                if not line:
                    break
                lines.append(line)
                total += len(line)
            return lines
        block = self._lines
        pending = block.readlines() if block is not None else []
        self._settle()
        start = self._pos  # where the pending lines end
        rest = io.BytesIO(self._bytes(start, max(start, self._size))).readlines()
        self._pos = max(start, self._size)
        return pending + rest if pending else rest

    def getbuffer(self) -> memoryview:
        """The whole blob as a read-only memoryview: zero-copy where the
        backend maps the blob (memory, files), else one copy.

        The view (and any slice or numpy array over it) stays valid after
        :meth:`close`, and the blob stays held and counted until the reader
        is closed and every such view is gone. ``view.obj`` is the object
        whose lifetime keeps the hold."""
        if self.closed:
            self._closed_error()
        with self._lock:
            if self._view is not None:
                exporter = self._view.obj
            else:
                if self._whole is None:
                    self._whole = self._copy_whole()
                exporter = self._whole.obj
            view = memoryview(exporter)
        if view.format != "B":
            view = view.cast("B")
        return view.toreadonly()

    def _copy_whole(self) -> memoryview:
        """The blob copied once into an anonymous mmap that keeps the hold."""
        if not self._size:
            view = _bytes_exporter(b"")
        else:
            mapped = mmap.mmap(-1, self._size)
            for offset in range(0, self._size, _COPY_CHUNK):
                length = min(_COPY_CHUNK, self._size - offset)
                chunk = self._source.read_range(offset, length)
                if len(chunk) != length:
                    raise IntegrityError(
                        f"the blob is shorter than its {self._size} bytes (at {offset})"
                    )
                mapped[offset : offset + length] = chunk
            view = memoryview(mapped).toreadonly()
        self._hold.keep(view.obj)
        return view

    def detach(self) -> io.RawIOBase:
        raise io.UnsupportedOperation("a blob reader has no raw stream to detach")

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            super().close()
            self._lines = None
            self.__next__ = _closed_next  # type: ignore[method-assign]
            self._block = b""
            view, self._view = self._view, None
            self._whole = None
            self._whole_bytes = None
        if view is not None:
            with contextlib.suppress(BufferError):  # then it ends with its exports
                view.release()
        del view
        try:
            if _PID.value == self._hold.pid:
                # Views still exported keep their exporter (the mapping) alive.
                self._source.close()
        finally:
            self._hold.drop()

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise unpicklable(self, "pickle the BlobLease or lease.transfer()")

    def __repr__(self) -> str:
        return describe(self, self._size, None if self.closed else self.tell())
