"""PostgresStorage passes the conformance suite with the S3 tier (SeaweedFS)
and with the directory tier (each store in a fresh namespace)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from blobleases import BlobStorage, ContentId, LeaseId, open_storage
from blobleases.blob_tier import DirectoryTier, S3Tier
from blobleases.postgres_storage import PostgresStorage
from blobleases.testing import BlobStorageTests
from pg_fixtures import BUCKET, s3_environment
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres


def _rewrite(storage: BlobStorage, cid: ContentId, data: bytes) -> None:
    """Replace the object of ``cid`` behind the store's back."""
    assert isinstance(storage, PostgresStorage)
    tier = storage.tier
    key = tier.key(cid)
    if isinstance(tier, DirectoryTier):
        path = os.path.join(tier.root, key)
        os.unlink(path)
        Path(path).write_bytes(data)
    else:
        assert isinstance(tier, S3Tier)
        tier._client().put_object(Bucket=tier.bucket, Key=key, Body=data)


def _stored(storage: BlobStorage, cid: ContentId) -> bytes:
    assert isinstance(storage, PostgresStorage)
    return b"".join(storage.tier.iter_object(storage.tier.key(cid), 0))


class _PostgresTests(BlobStorageTests):
    dsn: str = ""
    blobs: str = ""
    ttl_seconds = 0.5

    def make_storage(self, **policies: Any) -> BlobStorage:
        namespace = f"t-{uuid.uuid4().hex[:12]}"
        return PostgresStorage(self.dsn, blobs=self.blobs, namespace=namespace, **policies)

    def corrupt_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        data = bytearray(_stored(storage, content_id))
        data[0] ^= 0xFF
        _rewrite(storage, content_id, bytes(data))

    def truncate_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        data = _stored(storage, content_id)
        _rewrite(storage, content_id, data[: len(data) // 2])

    def test_url_reopens_the_same_store(self, storage: BlobStorage) -> None:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"shared by url", lid)
        again = open_storage(storage.url)
        try:
            assert isinstance(again, PostgresStorage)
            assert again.namespace == storage.namespace  # type: ignore[attr-defined]
            assert again.contains(cid)
            assert again.get_data(cid, lid) == b"shared by url"
        finally:
            again.close()


class TestPostgresS3(_PostgresTests):
    @pytest.fixture(autouse=True)
    def _servers(self, postgres_server: PostgresServer, s3_server: S3Server) -> Any:
        self.dsn = postgres_server.dsn
        prefix = uuid.uuid4().hex[:8]
        self.blobs = f"s3://{BUCKET}/{prefix}?endpoint={s3_server.endpoint}"
        with s3_environment():
            yield


class TestPostgresDirectory(_PostgresTests):
    @pytest.fixture(autouse=True)
    def _servers(self, postgres_server: PostgresServer, tmp_path: Path) -> None:
        self.dsn = postgres_server.dsn
        self.blobs = str(tmp_path / "blobs")
