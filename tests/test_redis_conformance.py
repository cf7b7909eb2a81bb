"""RedisStorage passes the conformance suite on a standalone server and on a
3-master Redis Cluster (each store in a fresh random namespace)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from blobleases import BlobStorage, ContentId
from blobleases.redis_storage import RedisStorage
from blobleases.testing import BlobStorageTests
from redis_servers import RedisCluster, RedisServer

pytestmark = pytest.mark.redis


def _chunk_keys(storage: BlobStorage, cid: ContentId) -> list[str]:
    assert isinstance(storage, RedisStorage)
    return storage._chunk_keys_for_tests(cid)


class _RedisTests(BlobStorageTests):
    url: str = ""
    ttl_seconds = 0.5

    def make_storage(self, **policies: Any) -> BlobStorage:
        namespace = f"t-{uuid.uuid4().hex[:12]}"
        # A small chunk size so that the suite's blobs span several chunks.
        return RedisStorage(self.url, namespace=namespace, chunk_size=16 * 1024, **policies)

    def corrupt_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        assert isinstance(storage, RedisStorage)
        key = _chunk_keys(storage, content_id)[0]
        first = storage.client.getrange(key, 0, 0)
        storage.client.setrange(key, 0, bytes([first[0] ^ 0xFF]))

    def truncate_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        assert isinstance(storage, RedisStorage)
        key = _chunk_keys(storage, content_id)[-1]
        data = storage.client.get(key)
        storage.client.set(key, data[: len(data) // 2])

    def test_url_reopens_the_same_store(self, storage: BlobStorage) -> None:
        from blobleases import LeaseId, open_storage

        lid = LeaseId.new()
        cid = storage.store_bytes(b"shared by url", lid)
        again = open_storage(storage.url)
        try:
            assert again.contains(cid)
            assert again.get_data(cid, lid) == b"shared by url"
        finally:
            again.close()


class TestRedisStandalone(_RedisTests):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.url = redis_server.url


class TestRedisCluster(_RedisTests):
    @pytest.fixture(autouse=True)
    def _server(self, redis_cluster: RedisCluster) -> None:
        self.url = redis_cluster.url
