"""A blob far larger than the client's memory budget goes to S3 and comes
back through a reader with seeks in bounded client memory (tracemalloc
peak), whatever its size: store_file streams a multipart upload, readers
fetch ranges. (96 MiB here, to keep the suite fast; nothing in the path
holds more than a few 8 MiB parts.)"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
import uuid
from pathlib import Path

import pytest

from blobleases import LeaseId
from blobleases.postgres_storage import PostgresStorage
from pg_fixtures import BUCKET, s3_environment
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres

MiB = 1 << 20
SIZE = 96 * MiB


def _piece(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (MiB // 32)


def test_large_blob_in_bounded_memory(
    postgres_server: PostgresServer, s3_server: S3Server, tmp_path: Path
) -> None:
    path = tmp_path / "large.bin"
    whole = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(SIZE // MiB):
            f.write(_piece(i))
            whole.update(_piece(i))
    namespace = f"l-{uuid.uuid4().hex[:12]}"
    with (
        s3_environment(),
        PostgresStorage(
            postgres_server.dsn,
            blobs=f"s3://{BUCKET}/{namespace}?endpoint={s3_server.endpoint}",
            namespace=namespace,
        ) as storage,
    ):
        lid = LeaseId.new()
        tracemalloc.start()
        try:
            cid = storage.store_file(path, lid)
            store_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            with storage.get_reader(cid, lid) as reader:
                again = hashlib.sha256()
                while block := reader.read(MiB):
                    again.update(block)
                reader.seek(SIZE - 100)
                tail = reader.read()
                reader.seek(37 * MiB + 5)
                middle = reader.read(64)
                reader.seek(-MiB, io.SEEK_END)
                assert reader.read(MiB) == _piece(SIZE // MiB - 1)
            read_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert cid.digest == whole.digest() == again.digest()
        assert tail == _piece(SIZE // MiB - 1)[-100:]
        assert middle == _piece(37)[5:69]
        assert store_peak < SIZE // 2, f"store_file peaked at {store_peak / MiB:.0f} MiB"
        assert read_peak < 16 * MiB, f"reading peaked at {read_peak / MiB:.0f} MiB"
        key = storage.tier.key(cid)
        assert storage.tier.size_of(key) == SIZE
        storage.advise_lease_dropped(lid, cid)
        assert storage.tier.size_of(key) is None
