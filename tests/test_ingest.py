"""blobleases.ingest: the one reader of store_file sources."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest

from blobleases import ContentId, StorageError, ingest
from blobleases.testing import blob


class _ReadOnly:
    """A file object with read() only (no readinto), returning short reads."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 1000))


def test_copy_hashes_and_writes_every_byte_in_bounded_chunks(tmp_path: Path) -> None:
    data = blob(3 * ingest.CHUNK + 17, 1)
    path = tmp_path / "src"
    path.write_bytes(data)
    for source in (path, str(path), io.BytesIO(data), _ReadOnly(data)):
        hasher = hashlib.sha256()
        out = bytearray()
        sizes: list[int] = []

        def write(chunk: memoryview, out: bytearray = out, sizes: list[int] = sizes) -> None:
            out.extend(chunk)
            sizes.append(chunk.nbytes)

        with ingest.open_source(source) as f:  # type: ignore[arg-type]
            assert ingest.copy(f, hasher, write) == len(data)
        assert bytes(out) == data and hasher.digest() == hashlib.sha256(data).digest()
        assert max(sizes) <= ingest.CHUNK
    for source in (path, str(path), io.BytesIO(data), _ReadOnly(data)):
        assert ContentId.for_file(source) == ContentId.for_bytes(data)  # type: ignore[arg-type]


def test_chunks_limit_and_text_sources() -> None:
    data = blob(5000, 2)
    got = b"".join(bytes(c) for c in ingest.chunks(io.BytesIO(data), 1024, limit=3000))
    assert got == data[:3000]
    with pytest.raises(TypeError, match="binary"):
        list(ingest.chunks(io.StringIO("text")))
    with pytest.raises(TypeError, match="binary"):
        ContentId.for_file(io.StringIO("text"))  # type: ignore[arg-type]


def test_open_source_leaves_file_objects_open_and_names_a_bad_path(tmp_path: Path) -> None:
    f = io.BytesIO(b"abc")
    with ingest.open_source(f) as got:
        assert got is f
    assert not f.closed
    missing = tmp_path / "missing"
    with (
        pytest.raises(StorageError, match=r"cannot read .*missing"),
        ingest.open_source(missing, ingest.cannot_read),
    ):
        pass


def test_read_errors_are_mapped() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(StorageError, match="source broke"):
        list(ingest.chunks(Broken(), cannot_read=lambda exc: StorageError("source broke")))
