"""BlobReader behaves as ``open(path, "rb")`` on every backend (SPEC section
1), its getbuffer() views keep its hold, and it refuses to be pickled."""

from __future__ import annotations

import errno
import gc
import io
import os
import pickle
import random
import unittest
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blobleases import BlobReader, BlobStorage, DirectoryStorage, LeaseId, MemoryStorage
from reader_fixtures import storage_fixture  # noqa: F401 (the storage fixture)


def _reader(storage: BlobStorage, data: bytes) -> tuple[BlobReader, Any, LeaseId]:
    lid = LeaseId.new()
    cid = storage.store_bytes(data, lid)
    return storage.get_reader(cid, lid), cid, lid


def _file(tmp_path: Path, data: bytes) -> io.BufferedReader:
    path = tmp_path / f"f-{uuid.uuid4().hex[:8]}.bin"
    path.write_bytes(data)
    return open(path, "rb")  # closed by the caller


def _text(seed: int, size: int) -> bytes:
    """Lines of random lengths (some longer than 64 KiB) with \\n, \\r\\n and
    lone \\r, ending without a newline."""
    rng = random.Random(seed)
    parts = []
    total = 0
    while total < size:
        length = rng.choice([0, 1, 5, 80, 200, 5000, 70_000])
        line = bytes(rng.choice(b"abc \r\t") for _ in range(min(length, 50))) * max(1, length // 50)
        line += rng.choice([b"\n", b"\r\n", b"\n", b"\r"])
        parts.append(line)
        total += len(line)
    return b"".join(parts) + b"tail without newline"


TRICKY = [
    b"",
    b"x",
    b"\n",
    b"\n\n\n",
    b"no newline at all",
    b"a\nb\nc",
    b"a\r\nb\rc\n\r",
    b"a\x0bb\x0cc\x1cd\x85e\n",  # splitlines would cut at these; files do not
    b"z" * 200_000 + b"\n" + b"y" * 10,
    (b"1234567890" * 6553 + b"\n") * 5,  # lines across the 64 KiB blocks
]


@pytest.mark.parametrize("data", TRICKY, ids=lambda d: f"{len(d)}b")
def test_lines_match_a_file(storage: BlobStorage, tmp_path: Path, data: bytes) -> None:
    reader, _, _ = _reader(storage, data)
    with reader, _file(tmp_path, data) as f:
        assert list(reader) == list(f)
        reader.seek(0), f.seek(0)
        assert reader.readlines() == f.readlines()
        reader.seek(0), f.seek(0)
        while True:
            line = reader.readline()
            assert line == f.readline()
            assert reader.tell() == f.tell()
            if not line:
                break
        for hint in (1, 7, 100_000):
            reader.seek(0), f.seek(0)
            assert reader.readlines(hint) == f.readlines(hint)
        for limit in (0, 1, 3, 70_000):
            reader.seek(0), f.seek(0)
            for _ in range(5):
                assert reader.readline(limit) == f.readline(limit)


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_match_a_file(storage: BlobStorage, tmp_path: Path, seed: int) -> None:
    data = _text(seed, 400_000)
    reader, _, _ = _reader(storage, data)
    rng = random.Random(seed)
    with reader, _file(tmp_path, data) as f:
        for _ in range(400):
            op = rng.choice(
                ["read", "read1", "readline", "next", "readlines", "readinto", "seek", "peek"]
            )
            n = rng.choice([-1, 0, 1, 10, 1000, 70_000, None])
            if op == "read":
                assert reader.read(n) == f.read(n)
            elif op == "read1":
                m = -1 if n is None else n
                got = reader.read1(m)
                assert got == f.read(len(got)) and (got or m == 0 or f.tell() >= len(data))
            elif op == "readline":
                assert reader.readline(n) == f.readline(n)
            elif op == "next":
                assert next(reader, None) == next(f, None)
            elif op == "readlines":
                hint = rng.choice([0, 1, 100, 10_000])
                assert reader.readlines(hint) == f.readlines(hint)
            elif op == "readinto":
                a, b = bytearray(rng.choice([0, 1, 999, 80_000])), None
                b = bytearray(len(a))
                assert reader.readinto(a) == f.readinto(b) and a == b
            elif op == "peek":
                got = reader.peek(rng.choice([0, 1, 100]))
                rest = data[f.tell() :]
                assert rest.startswith(got) and (bool(got) == bool(rest))
            else:
                whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
                offset = rng.randint(-500_000, 500_000)
                try:
                    expected: Any = f.seek(offset, whence)
                except OSError as exc:
                    expected = exc.errno
                try:
                    got_seek: Any = reader.seek(offset, whence)
                except OSError as exc:
                    got_seek = exc.errno
                assert got_seek == expected
            assert reader.tell() == f.tell()


def test_seek_before_the_start_is_oserror_einval(storage: BlobStorage) -> None:
    reader, _, _ = _reader(storage, b"0123456789")
    with reader:
        for offset, whence in ((-1, io.SEEK_SET), (-11, io.SEEK_END), (-1, io.SEEK_CUR)):
            with pytest.raises(OSError) as info:
                reader.seek(offset, whence)
            assert info.value.errno == errno.EINVAL
            assert reader.tell() == 0
        with pytest.raises(ValueError, match="whence"):
            reader.seek(0, 3)


def test_zipfile_probes_a_tiny_blob(storage: BlobStorage, tmp_path: Path) -> None:
    """zipfile seeks 22 bytes before the end and catches OSError, as files raise."""
    reader, _, _ = _reader(storage, b"tiny")
    with reader:
        assert zipfile.is_zipfile(reader) is False
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    reader, _, _ = _reader(storage, buffer.getvalue())
    with reader, zipfile.ZipFile(reader) as archive:
        assert archive.read("a.txt") == b"hello"


def test_offsets_and_sizes_take_any_index(storage: BlobStorage) -> None:
    np = pytest.importorskip("numpy")
    data = b"0123456789\nabcdef\n"
    reader, _, _ = _reader(storage, data)
    with reader:
        assert reader.seek(np.int64(3)) == 3
        assert reader.seek(np.int32(2), np.int8(io.SEEK_CUR)) == 5
        assert reader.read(np.uint16(2)) == b"56"
        assert reader.readline(np.int64(2)) == b"78"
        assert reader.peek(np.int64(1))[:1] == b"9"
        assert reader.readlines(np.int64(1)) == [b"9\n"]
        assert reader.seek(True) == 1  # a bool is an int, as for files
        for bad in (1.0, "1", None):
            with pytest.raises(TypeError):
                reader.seek(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            reader.read(2.0)  # type: ignore[arg-type]


CLOSED_CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("read", lambda r: r.read()),
    ("read1", lambda r: r.read1(1)),
    ("readinto", lambda r: r.readinto(bytearray(1))),
    ("readline", lambda r: r.readline()),
    ("readlines", lambda r: r.readlines()),
    ("next", lambda r: next(r)),
    ("iter", lambda r: iter(r)),
    ("peek", lambda r: r.peek()),
    ("seek", lambda r: r.seek(0)),
    ("tell", lambda r: r.tell()),
    ("readable", lambda r: r.readable()),
    ("seekable", lambda r: r.seekable()),
    ("writable", lambda r: r.writable()),
    ("isatty", lambda r: r.isatty()),
    ("flush", lambda r: r.flush()),
    ("enter", lambda r: r.__enter__()),
    ("getbuffer", lambda r: r.getbuffer()),
]


@pytest.mark.parametrize(("name", "call"), CLOSED_CALLS, ids=[n for n, _ in CLOSED_CALLS])
def test_every_method_of_a_closed_reader_raises_valueerror(
    storage: BlobStorage, tmp_path: Path, name: str, call: Callable[[Any], Any]
) -> None:
    reader, _, _ = _reader(storage, b"some bytes\n")
    reader.close()
    reader.close()  # twice is fine, as for files
    assert reader.closed
    with pytest.raises(ValueError):
        call(reader)
    # A closed file's writable() says False (BytesIO's raises): the spec
    # has every method of a closed reader raise.
    if name not in ("getbuffer", "writable"):
        f = _file(tmp_path, b"some bytes\n")
        f.close()
        with pytest.raises(ValueError):
            call(f)


def test_pickling_a_reader_says_to_send_its_lease(storage: BlobStorage) -> None:
    reader, _, _ = _reader(storage, b"abc")
    with reader:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError, match="lease"):
                pickle.dumps(reader, protocol=protocol)
    import copy

    with pytest.raises(TypeError, match="lease"):
        copy.copy(reader)


def test_peek_returns_a_useful_amount(storage: BlobStorage) -> None:
    data = bytes(range(256)) * 100
    reader, _, _ = _reader(storage, data)
    with reader:
        reader.seek(10)
        got = reader.peek(1)
        assert len(got) >= 4096 and data[10:].startswith(got)
        assert reader.tell() == 10
        reader.seek(len(data) - 3)
        assert reader.peek(100) == data[-3:]
        reader.seek(len(data))
        assert reader.peek() == b""


def test_io_wrappers_read_lines(storage: BlobStorage) -> None:
    """TextIOWrapper and numpy read through the reader's lines."""
    data = "".join(f"{i} {i * 0.5}\n" for i in range(5000)).encode()
    reader, _, _ = _reader(storage, data)
    with reader:
        text = io.TextIOWrapper(reader, encoding="ascii")
        assert text.readlines()[4999] == "4999 2499.5\n"
        text.detach()
    np = pytest.importorskip("numpy")
    reader, _, _ = _reader(storage, data)
    with reader:
        assert np.loadtxt(reader).shape == (5000, 2)


# -- getbuffer views keep the hold ------------------------------------------


def test_views_outlive_close_and_keep_the_hold(storage: BlobStorage) -> None:
    np = pytest.importorskip("numpy")
    data = np.arange(1 << 17, dtype=np.float64)
    reader, cid, lid = _reader(storage, data.tobytes())
    view = reader.getbuffer()
    assert view.readonly and view.format == "B" and view.nbytes == data.nbytes
    array = np.frombuffer(view, dtype=np.float64)[::2]
    del view
    reader.close()
    storage.advise_lease_dropped(lid, cid)
    # The reader is closed and its lease gone, but an array still views it.
    assert storage.contains(cid)
    assert storage.stat(cid).reader_count == 1
    assert storage.stats().bytes == data.nbytes
    assert (array == data[::2]).all()
    del array  # the last view: the hold ends at once (no gc needed)
    assert not storage.contains(cid)
    assert storage.stats().blobs == 0
    assert not storage.verify()


def test_views_after_the_reader_is_collected(storage: BlobStorage) -> None:
    reader, cid, lid = _reader(storage, b"kept by a view" * 1000)
    view = reader.getbuffer()[5:20]
    storage.advise_lease_dropped(lid, cid)
    del reader
    gc.collect()
    assert storage.contains(cid)
    assert bytes(view) == (b"kept by a view" * 1000)[5:20]
    view.release()
    assert not storage.contains(cid)


def test_each_getbuffer_view_is_independent(storage: BlobStorage) -> None:
    reader, cid, lid = _reader(storage, b"x" * 5000)
    first, second = reader.getbuffer(), reader.getbuffer()
    storage.advise_lease_dropped(lid, cid)
    reader.close()
    first.release()
    assert storage.contains(cid) and bytes(second[:3]) == b"xxx"
    del second
    assert not storage.contains(cid)


def test_empty_blob_views(storage: BlobStorage) -> None:
    reader, cid, lid = _reader(storage, b"")
    view = reader.getbuffer()
    storage.advise_lease_dropped(lid, cid)
    reader.close()
    assert bytes(view) == b"" and storage.contains(cid)
    del view
    assert not storage.contains(cid)


def test_a_forked_child_never_ends_the_parents_hold(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s") as storage:
        reader, cid, lid = _reader(storage, b"held across fork" * 100)
        view = reader.getbuffer()
        reader.close()
        storage.advise_lease_dropped(lid, cid)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                del view
                gc.collect()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert storage.contains(cid) and storage.stat(cid).reader_count == 1
        del view
        assert not storage.contains(cid)


# -- CPython's own BytesIO tests, where a file and BytesIO agree ------------


def _cpython_memoryio() -> Any:
    try:
        from test import test_memoryio
    except ImportError:  # pragma: no cover - a Python without its test package
        return None
    return test_memoryio


_MEMORYIO = _cpython_memoryio()
if _MEMORYIO is None:  # pragma: no cover

    def test_cpython_memoryio_tests_available() -> None:
        pytest.skip("this Python has no test.test_memoryio (its test package is not installed)")

else:
    _STORES: dict[str, BlobStorage] = {}

    def _reader_class(kind: str) -> Callable[[bytes], BlobReader]:
        def make(data: bytes = b"") -> BlobReader:
            storage = _STORES.get(kind)
            if storage is None:
                storage = _STORES[kind] = (
                    MemoryStorage() if kind == "memory" else DirectoryStorage.temporary()
                )
            return _reader(storage, data)[0]

        return make

    _Mixin = _MEMORYIO.MemoryTestMixin
    _Bytes = _MEMORYIO.PyBytesIOTest

    class _CPythonBytesIOTests(_MEMORYIO.MemorySeekTestMixin):  # type: ignore[misc, name-defined]
        """The tests of test_memoryio that apply to a read-only file. Not
        run: test_seek and test_relative_seek (BytesIO clamps or raises
        ValueError where files raise OSError), and every test that writes."""

        EOF = b""
        UnsupportedOperation = io.UnsupportedOperation
        buftype = staticmethod(_Bytes.buftype)

        test_read = _Mixin.test_read
        test_readline = _Mixin.test_readline
        test_readlines = _Mixin.test_readlines
        test_iterator = _Mixin.test_iterator
        test_tell = _Mixin.test_tell
        test_flush = _Mixin.test_flush
        test_detach = _Mixin.test_detach
        test_read1 = _Bytes.test_read1
        test_readinto = _Bytes.test_readinto

    class TestCPythonBytesIOOnMemory(_CPythonBytesIOTests, unittest.TestCase):
        ioclass = staticmethod(_reader_class("memory"))

    class TestCPythonBytesIOOnDirectory(_CPythonBytesIOTests, unittest.TestCase):
        ioclass = staticmethod(_reader_class("directory"))


def teardown_module() -> None:
    for made in _STORES.values() if _MEMORYIO is not None else ():
        made.close()
