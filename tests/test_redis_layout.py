"""RedisStorage's key layout is versioned: a new store is marked with
keys.LAYOUT_VERSION, and a store of another layout (layout 1: blobleases
before the layout key, with short key and field names) is refused with a
StorageError naming the layout, never misread. Real redis-server."""

from __future__ import annotations

import uuid
from importlib import resources

import pytest

from blobleases import ContentId, LeaseId, StorageError
from blobleases.redis.keys import LAYOUT_VERSION, Keys, Meta
from blobleases.redis_storage import RedisStorage
from redis_servers import RedisServer

pytestmark = pytest.mark.redis


def _namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def test_a_new_store_is_marked_with_its_layout(redis_server: RedisServer) -> None:
    namespace = _namespace()
    with RedisStorage(redis_server.url, namespace=namespace) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"layout two", lid)
        assert storage.client.get(Keys(namespace).layout) == str(LAYOUT_VERSION).encode()
        meta = storage.client.hgetall(Keys(namespace).meta(cid))
        assert meta[Meta.SIZE.encode()] == b"10"
        assert {Meta.CREATED, Meta.LAST_ACCESS, Meta.UPLOAD} <= {k.decode() for k in meta}
    with RedisStorage(redis_server.url, namespace=namespace) as again:  # reopens
        assert again.get_data(cid, lid) == b"layout two"


def test_a_layout_1_store_is_refused_naming_its_layout(redis_server: RedisServer) -> None:
    namespace = _namespace()
    with RedisStorage(redis_server.url, namespace=_namespace()) as other:
        raw = other.client
        cid = ContentId.for_bytes(b"old")
        # What blobleases before the layout key wrote for one blob.
        old = f"{namespace}:{{{namespace}}}:"
        raw.hset(old + "idx", str(cid), "3 host/1/abc")
        raw.set(old + "bytes", 3)
        raw.zadd(old + "lru", {str(cid): 1.0})
        raw.hset(f"{namespace}:{{{cid}}}:m", mapping={"s": 3, "n": 1, "c": 4096, "t": "host/1/abc"})
        raw.set(f"{namespace}:{{{cid}}}:d:0", b"old")
        before = sorted(raw.scan_iter(match=f"{namespace}:*"))
        with pytest.raises(StorageError, match="layout 1"):
            RedisStorage(redis_server.url, namespace=namespace)
        assert sorted(raw.scan_iter(match=f"{namespace}:*")) == before, "a refused open wrote"


def test_a_store_of_an_unknown_layout_is_refused(redis_server: RedisServer) -> None:
    namespace = _namespace()
    with RedisStorage(redis_server.url, namespace=_namespace()) as other:
        other.client.set(Keys(namespace).layout, LAYOUT_VERSION + 1)
        with pytest.raises(StorageError, match=f"layout {LAYOUT_VERSION + 1}"):
            RedisStorage(redis_server.url, namespace=namespace)


def test_the_scripts_use_the_meta_field_names() -> None:
    lua = resources.files("blobleases.redis").joinpath("scripts.lua").read_text("utf-8")
    for name, value in vars(Meta).items():
        if name.isupper():
            assert f"'{value}'" in lua, f"scripts.lua never names meta field {value!r}"
