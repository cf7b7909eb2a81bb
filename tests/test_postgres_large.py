"""PostgresStorage in bounded client memory (tracemalloc peaks).

A 2 GiB blob goes to S3 and comes back through a reader with seeks: the
source is generated on the fly (only the server's copy is on disk),
store_file streams a multipart upload, readers fetch ranges. 100,000 blobs
are listed, verified and collected a page at a time."""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blobleases import ContentId, LeaseId
from blobleases.blob_tier import DirectoryTier, S3Tier
from blobleases.postgres_storage import PostgresStorage
from pg_fixtures import s3_store
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres

MiB = 1 << 20
GiB = 1 << 30
#: The whole 2 GiB on one Python of CI's three (the slowest test of the
#: suite otherwise: ~3 passes over the bytes, each bound by the S3 server).
SIZE = 2 * GiB if sys.version_info[:2] == (3, 13) else 256 * MiB
#: Bytes of the source generated at a time.
BLOCK = MiB
_BASE = random.Random(2026).randbytes(BLOCK)


def _block(i: int) -> bytes:
    """Block ``i`` of the source: a rotation of one random block, by an
    amount that differs from block to block (so a byte read from the wrong
    place shows), generated in a copy instead of a random draw."""
    k = (i * 2654435761 + 12345) % BLOCK
    return _BASE[k:] + _BASE[:k]


def _expected(offset: int, length: int) -> bytes:
    """The source's bytes at ``offset``, generated again."""
    out = []
    end = min(offset + length, SIZE)
    while offset < end:
        i, k = divmod(offset, BLOCK)
        piece = _block(i)[k : k + end - offset]
        out.append(piece)
        offset += len(piece)
    return b"".join(out)


class _Generated(io.RawIOBase):
    """A seekable, read-only file of ``SIZE`` deterministic pseudo-random
    bytes that exist nowhere but here (one block held at a time)."""

    def __init__(self) -> None:
        self.pos = 0
        self.cached: tuple[int, bytes] = (-1, b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: SIZE}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        i, k = divmod(self.pos, BLOCK)
        n = min(len(view), BLOCK - k, max(SIZE - self.pos, 0))
        if n <= 0:
            return 0
        if self.cached[0] != i:
            self.cached = (i, _block(i))
        view[:n] = self.cached[1][k : k + n]
        self.pos += n
        return n


def test_large_blob_in_bounded_memory(postgres_server: PostgresServer, s3_server: S3Server) -> None:
    whole = hashlib.sha256()
    for i in range(SIZE // BLOCK):
        whole.update(_block(i))
    with s3_store(postgres_server, s3_server, "l") as storage:
        lid = LeaseId.new()
        seeks = [
            (SIZE - 100, 100),
            (37 * MiB + 5, 64),
            (BLOCK - 3, 7),  # across a block boundary of the source
            (SIZE // 2 - 4 * MiB - 1, 9 * MiB),  # across read-ahead windows
            (0, 10),
        ]
        tracemalloc.start()
        try:
            source = _Generated()
            cid = storage.store_file(source, lid)  # type: ignore[arg-type]
            store_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            at_seeks = []
            with storage.get_reader(cid, lid) as reader:
                again = hashlib.sha256()
                offset = 0
                mismatched = None
                while block := reader.read(BLOCK):
                    again.update(block)
                    if mismatched is None and block != _block(offset // BLOCK):
                        mismatched = offset
                    offset += len(block)
                for where, length in seeks:
                    reader.seek(where)
                    at_seeks.append(reader.read(length))
                reader.seek(-MiB, io.SEEK_END)
                last = reader.read(MiB)
            read_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert offset == SIZE
        assert mismatched is None, f"wrong bytes in the block at {mismatched}"
        assert cid.digest == whole.digest() == again.digest()
        for (where, length), got in zip(seeks, at_seeks, strict=True):
            assert got == _expected(where, length), f"wrong bytes at {where}"
        assert last == _block(SIZE // BLOCK - 1)
        # a few 8 MiB multipart parts, never the blob
        assert store_peak < 64 * MiB, f"store_file peaked at {store_peak / MiB:.0f} MiB"
        assert read_peak < 32 * MiB, f"reading peaked at {read_peak / MiB:.0f} MiB"
        key = storage.tier.key(cid)
        assert storage.tier.size_of(key) == SIZE
        storage.advise_lease_dropped(lid, cid)
        assert storage.tier.size_of(key) is None


# -- 100,000 blobs: the listings in bounded memory ---------------------------------

MANY = 100_000


def _per_entry() -> float:
    """What one entry of a listing held whole takes here (a content id's text
    in a set and its key and size in a list), measured."""
    ids = [ContentId.for_bytes(b"%d" % i) for i in range(10_000)]
    tracemalloc.start()
    try:
        texts = {str(c) + "" for c in ids}
        keys = [(f"x/{c.hex}", i) for i, c in enumerate(ids)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del texts, keys
    return held / 10_000


def _bulk(storage: PostgresStorage, count: int) -> list[ContentId]:
    """``count`` tiny blobs, each with a detached lease, written in bulk: the
    rows by COPY into the store's own tables, the bytes through its tier
    (``store_bytes`` takes several transactions each: minutes for 100,000).
    Returns the content ids in ascending order of their text."""
    ids = [ContentId.for_bytes(b"%d" % i) for i in range(count)]
    now = time.time()
    owner = storage._owner(os.getpid())
    with psycopg.connect(storage._conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(storage.namespace)))
        with conn.cursor() as cur:
            with cur.copy("COPY content(cid, size, created, last_access) FROM STDIN") as copy:
                for i, cid in enumerate(ids):
                    copy.write_row((str(cid), len(b"%d" % i), now, now))
            with cur.copy(
                "COPY leases(cid, lid, pid, expires_at, detached, owner) FROM STDIN"
            ) as copy:
                for cid in ids:
                    lid = LeaseId.new()
                    copy.write_row((str(cid), str(lid), lid.pid, None, True, owner))
    return sorted(ids, key=str)


def _peaks(storage: PostgresStorage) -> dict[str, int]:
    """tracemalloc peaks of walking iter_content, collect() and verify()."""
    peaks: dict[str, int] = {}
    tracemalloc.start()
    try:
        count = sum(1 for _ in storage.iter_content())
        peaks["iter_content"] = tracemalloc.get_traced_memory()[1]
        assert count == storage.stats().blobs
        tracemalloc.reset_peak()
        storage.collect()
        peaks["collect"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peaks


def _check_bounded(peaks: dict[str, int], count: int) -> None:
    whole = count * _per_entry()
    for name, peak in peaks.items():
        # a page of rows and a page of the listing, not the whole of either
        assert peak < whole / 10, (
            f"{name} peaked at {peak / MiB:.1f} MiB: as much as "
            f"{peak / whole * count:.0f} of the {count} entries held at once "
            f"(one takes {whole / count:.0f} bytes)"
        )


def test_100k_blobs_in_a_directory_tier_list_verify_and_collect_in_bounded_memory(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    namespace = f"m-{uuid.uuid4().hex[:12]}"
    with PostgresStorage(
        postgres_server.dsn, blobs=str(tmp_path / "blobs"), namespace=namespace
    ) as storage:
        ids = _bulk(storage, MANY)
        tier = storage.tier
        assert isinstance(tier, DirectoryTier)
        missing = {ids[7], ids[MANY // 2], ids[-1]}
        # the files where the tier keeps them (its put() takes 4 calls more each)
        for i, cid in enumerate(ContentId.for_bytes(b"%d" % i) for i in range(MANY)):
            if cid not in missing:
                path = os.path.join(tier.root, tier.key(cid))
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(path))
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, b"%d" % i)
                os.close(fd)
        orphans = [ContentId.for_bytes(b"orphan %d" % i) for i in range(3)]
        for cid in orphans:
            tier.put(tier.key(cid), [b"o"], 1)
        foreign = tmp_path / "blobs" / "sha256" / "not-a-blob"
        foreign.write_bytes(b"?")
        tracemalloc.start()
        try:
            report = storage.verify()
            verify_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        _check_bounded({"verify": verify_peak, **_peaks(storage)}, MANY)
        assert report.checked == MANY
        assert set(report.missing) == missing
        assert not report.corrupted
        assert sorted(report.orphaned) == sorted(
            [f"{tier.url}/{tier.key(c)}" for c in orphans] + [f"{tier.url}/sha256/not-a-blob"]
        )
        # the collect() of _peaks removed the orphans, nothing else
        assert storage.stats().blobs == MANY
        assert not foreign.exists()
        assert all(tier.size_of(tier.key(c)) is None for c in orphans)
        assert tier.size_of(tier.key(ids[8])) is not None


def test_100k_rows_with_an_s3_tier_list_and_collect_in_bounded_memory(
    postgres_server: PostgresServer, s3_server: S3Server
) -> None:
    """100,000 rows, a few hundred objects (100,000 PUTs to the test server
    take minutes), listed in pages of 50 keys so the merge crosses pages."""
    with s3_store(postgres_server, s3_server, "m") as storage:
        ids = _bulk(storage, MANY)
        tier = storage.tier
        assert isinstance(tier, S3Tier)
        tier.list_page_size = 50
        kept = ids[:: MANY // 300]
        for cid in kept:
            tier.put(tier.key(cid), [b"k"], 1)
        orphans = [ContentId.for_bytes(b"orphan %d" % i) for i in range(5)]
        for cid in orphans:
            tier.put(tier.key(cid), [b"o"], 1)
        _check_bounded(_peaks(storage), MANY)
        listed = {key for key, _ in tier.list_keys()}
        assert listed == {tier.key(c) for c in kept}
        assert storage.stats().blobs == MANY
