"""RedisStorage's eviction claims (blobleases.redis.eviction), on a real
redis-server: while a store holds a claim on content it is evicting, new
leases and readers of that content wait; a claim whose store died lapses
at its deadline and the content is usable again; a waiter gives up after
lock_timeout with StorageError naming the content."""

from __future__ import annotations

import time
import uuid

import pytest

from blobleases import ContentId, LeaseId, StorageError, StoreFull
from blobleases.redis.keys import Keys, Meta
from blobleases.redis_storage import RedisStorage
from redis_servers import RedisServer

pytestmark = pytest.mark.redis


def _claim(storage: RedisStorage, cid: ContentId, deadline: float) -> None:
    """What the claim script writes for a store that then died."""
    key = Keys(storage.namespace).meta(cid)
    storage.client.hset(key, Meta.EVICTING, f"gone-host/1/dead {deadline!r}")


def test_a_claim_whose_store_died_lapses(redis_server: RedisServer) -> None:
    with RedisStorage(redis_server.url, namespace=f"t-{uuid.uuid4().hex[:12]}") as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"claimed by a dead store", lid)
        _claim(storage, cid, time.time() + 0.3)
        with storage.get_reader(cid, lid) as reader:  # waits until the claim lapses
            assert reader.read() == b"claimed by a dead store"
        other = LeaseId.new()
        _claim(storage, cid, time.time() + 0.3)
        storage.lease_by_content(cid, other)
        assert storage.get_data(cid, other) == b"claimed by a dead store"
        assert not storage.client.hexists(Keys(storage.namespace).meta(cid), Meta.EVICTING)
        assert not storage.verify()


def test_waiting_for_a_claim_is_bounded_by_lock_timeout(redis_server: RedisServer) -> None:
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    with RedisStorage(redis_server.url, namespace=namespace, lock_timeout=0.2) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"claimed for an hour", lid)
        _claim(storage, cid, time.time() + 3600)
        with pytest.raises(StorageError, match=str(cid)):
            storage.get_reader(cid, lid)
        with pytest.raises(StorageError, match="evicting"):
            storage.lease_by_content(cid, LeaseId.new())
        storage.client.hdel(Keys(namespace).meta(cid), Meta.EVICTING)
        info = storage.stat(cid)
        assert (info.lease_count, info.reader_count) == (1, 0)  # the waits added nothing
        owner = storage._owner(lid.pid)
        holds = {m.decode() for m in storage.client.smembers(Keys(namespace).holds(owner))}
        assert holds == {f"lease {cid} {lid}"}, "a wait that gave up left bookkeeping"
        assert storage.get_data(cid, lid) == b"claimed for an hour"


def test_a_store_does_not_evict_content_another_store_claimed(
    redis_server: RedisServer,
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    policies = {"max_bytes": 10_000, "on_full": "evict"}
    with RedisStorage(redis_server.url, namespace=namespace, **policies) as storage:
        first = bytes(range(256)) * 24  # 6144 bytes
        lid = LeaseId.new()
        cid = storage.store_bytes(first, lid)
        _claim(storage, cid, time.time() + 3600)
        with pytest.raises(StoreFull, match="max_bytes"):
            storage.store_bytes(b"x" * 6000, LeaseId.new())
        assert storage.contains(cid)
        storage.client.hdel(Keys(namespace).meta(cid), Meta.EVICTING)
        assert storage.get_data(cid, lid) == first
