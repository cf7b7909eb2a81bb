"""PostgresStorage under faults on real servers: PostgreSQL restarted mid-run,
the S3 server stopped mid-upload, objects deleted or corrupted behind the
store's back."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from blobleases import ContentId, IntegrityError, LeaseExpired, LeaseId, StorageError
from blobleases.blob_tier import MULTIPART_PART, S3Tier
from blobleases.postgres_storage import PostgresStorage
from pg_fixtures import BUCKET, postgres_started, s3_environment
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own (it gets restarted)."""
    with postgres_started() as server:
        yield server


def _open(dsn: str, s3: S3Server, **policies: Any) -> PostgresStorage:
    namespace = f"f-{uuid.uuid4().hex[:12]}"
    blobs = f"s3://{BUCKET}/{namespace}?endpoint={s3.endpoint}"
    return PostgresStorage(dsn, blobs=blobs, namespace=namespace, **policies)


def test_postgres_restarted_mid_run(own_postgres: PostgresServer, s3_server: S3Server) -> None:
    with s3_environment(), _open(own_postgres.dsn, s3_server) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"before the restart", lid)
        own_postgres.restart(mode="immediate")
        # the pool's connections are broken: the next operations reconnect
        assert storage.get_data(cid, lid) == b"before the restart"
        other = storage.store_bytes(b"after the restart", LeaseId.new())
        assert storage.contains(other)
        storage.advise_lease_dropped(lid, cid)
        assert not storage.contains(cid)
        assert not storage.verify()


class _StopsServer(io.RawIOBase):
    """A file whose second pass (the upload, after the hashing pass) stops
    the S3 server (SIGSTOP: it answers nothing, as a hung or unplugged
    server) once ``after`` bytes of it have been read."""

    def __init__(self, data: bytes, server: S3Server, after: int) -> None:
        self.inner = io.BytesIO(data)
        self.server = server
        self.after = after
        self.passes = 0
        self.read_in_pass = 0
        self.stopped = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if offset == 0 and whence == 0:
            self.passes += 1
            self.read_in_pass = 0
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def readinto(self, buffer: Any) -> int:
        if self.passes >= 2 and self.read_in_pass >= self.after and not self.stopped:
            self.server.pause()
            self.stopped = True
        n = self.inner.readinto(buffer)
        self.read_in_pass += n
        return n


def test_s3_stopped_mid_upload_leaves_nothing(
    postgres_server: PostgresServer, s3_server: S3Server
) -> None:
    own_s3 = s3_server
    data = bytes(range(256)) * ((3 * MULTIPART_PART) // 256)  # a multipart upload
    cid = ContentId.for_bytes(data)
    with s3_environment():
        storage = _open(postgres_server.dsn, own_s3, lock_timeout=1)
    source = _StopsServer(data, own_s3, after=MULTIPART_PART + 1)
    try:
        source.seek(0)
        with s3_environment(), pytest.raises(StorageError):
            storage.store_file(source, LeaseId.new())
        assert source.stopped, "the server was not stopped mid-upload"
        assert not storage.contains(cid)
        assert not list(storage.iter_leases())
        own_s3.resume()
        source.stopped = False
        tier = storage.tier
        assert tier.size_of(tier.key(cid)) is None  # the parts never became an object
        storage.collect()
        assert storage._exec("SELECT count(*) FROM uploads")[0][0] == 0
        assert storage._exec("SELECT count(*) FROM deleting")[0][0] == 0
        assert list(tier.list_keys()) == []
        assert not storage.verify()
        # and the store works again
        lid = LeaseId.new()
        assert storage.store_file(io.BytesIO(data), lid) == cid
        assert storage.get_data(cid, lid) == data
    finally:
        if source.stopped:
            own_s3.resume()
        storage.close()


@pytest.fixture
def s3_storage(postgres_server: PostgresServer, s3_server: S3Server) -> Iterator[PostgresStorage]:
    with s3_environment(), _open(postgres_server.dsn, s3_server) as storage:
        yield storage


def test_object_deleted_behind_the_back_is_an_integrity_error(s3_storage: PostgresStorage) -> None:
    lid = LeaseId.new()
    cid = s3_storage.store_bytes(b"soon gone" * 100, lid)
    s3_storage.tier.delete(s3_storage.tier.key(cid))
    with pytest.raises(IntegrityError):
        s3_storage.get_data(cid, lid)
    with pytest.raises(IntegrityError):
        s3_storage.get_reader(cid, lid)
    report = s3_storage.verify()
    assert report.missing == [cid]
    assert s3_storage.verify(repair=True).repaired
    with pytest.raises(LeaseExpired):
        s3_storage.get_data(cid, lid)
    assert not s3_storage.verify()


def test_object_corrupted_behind_the_back_is_never_returned(
    postgres_server: PostgresServer, s3_server: S3Server
) -> None:
    with s3_environment(), _open(postgres_server.dsn, s3_server, verify_reads=True) as storage:
        lid = LeaseId.new()
        data = b"exact bytes " * 1000
        cid = storage.store_bytes(data, lid)
        tier = storage.tier
        assert isinstance(tier, S3Tier)
        bad = bytearray(data)
        bad[100] ^= 1
        tier._client().put_object(Bucket=tier.bucket, Key=tier.key(cid), Body=bytes(bad))
        with pytest.raises(IntegrityError):
            storage.get_data(cid, lid)
        with pytest.raises(IntegrityError):
            storage.get_reader(cid, lid)
        assert storage.verify().corrupted == [cid]
        storage.verify(repair=True)
        assert not storage.contains(cid)
        assert tier.size_of(tier.key(cid)) is None


def test_orphaned_object_is_reported_and_collected(s3_storage: PostgresStorage) -> None:
    tier = s3_storage.tier
    data = b"nobody's"
    cid = ContentId.for_bytes(data)
    assert tier.put(tier.key(cid), [data], len(data))
    report = s3_storage.verify()
    assert len(report.orphaned) == 1 and cid.hex in report.orphaned[0]
    assert s3_storage.collect().files_removed == 1
    assert tier.size_of(tier.key(cid)) is None
    assert not s3_storage.verify()


def test_a_postgres_server_that_does_not_answer_is_a_storage_error(
    own_postgres: PostgresServer, s3_server: S3Server
) -> None:
    with s3_environment(), _open(own_postgres.dsn, s3_server, lock_timeout=1) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"while it answers", lid)
        own_postgres.pause()  # SIGSTOP: connections stay open, nothing answers
        try:
            with pytest.raises(StorageError, match=r"did not answer|no connection|connect"):
                storage.get_data(cid, lid)
            with pytest.raises(StorageError):
                storage.lease_by_content(cid, LeaseId.new())
        finally:
            own_postgres.resume()
        assert storage.get_data(cid, lid) == b"while it answers"


class _CollectsRightAfterEachTransaction(PostgresStorage):
    """Runs a whole collect() on another thread right after each of its
    transactions commits: the widest window a concurrent collect can hit."""

    def _tx(self, work: Any, **kwargs: Any) -> Any:
        result = super()._tx(work, **kwargs)
        if getattr(self, "_collecting", False):
            return result
        errors: list[BaseException] = []

        def collect() -> None:
            self._collecting = True
            try:
                self.collect()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=collect)
        thread.start()
        thread.join()
        self._collecting = False
        assert not errors, errors
        return result


def test_a_collect_between_an_upload_row_and_its_commit_never_takes_it_for_a_leftover(
    postgres_server: PostgresServer, s3_server: S3Server
) -> None:
    namespace = f"c-{uuid.uuid4().hex[:12]}"
    blobs = f"s3://{BUCKET}/{namespace}?endpoint={s3_server.endpoint}"
    with s3_environment(), _CollectsRightAfterEachTransaction(
        postgres_server.dsn, blobs=blobs, namespace=namespace
    ) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"stored while another thread collects", lid)
        assert storage.get_data(cid, lid) == b"stored while another thread collects"
        assert not storage.verify()
