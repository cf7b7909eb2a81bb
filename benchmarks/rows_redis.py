"""Row 9: RedisStorage against raw redis-py SET/GET on the same server."""

from __future__ import annotations

import contextlib
import itertools
import os

from blobleases import BlobManager, BlobStorage

from .backends import redis_server, redis_storage_class
from .harness import Context, MiB, Target, UniqueBlobs, interleave, size_text
from .workloads import put_get, store_get

__all__ = ["redis_rows"]


def redis_rows(ctx: Context) -> None:
    s = ctx.sizes
    size = size_text(s.blob)
    row = ctx.row(
        f"9 store+get {size}, RedisStorage, store+get_data",
        "MiB/s",
        "redis-py SET+GET",
        Target(">=", 0.7),
    )
    rs = redis_storage_class()
    import redis

    with redis_server(ctx.redis_server, ctx.path("redis")) as url:
        storage: BlobStorage = rs(url, namespace=f"bench{os.getpid()}")
        client = redis.Redis.from_url(url)
        blobs = UniqueBlobs(s.blob)
        mgr = BlobManager(storage)
        keys = (f"raw:{n}" for n in itertools.count())
        try:

            def candidate() -> float:
                return store_get(mgr, blobs.make(s.redis_batch))

            def raw() -> float:
                return put_get(
                    blobs.make(s.redis_batch),
                    keys,
                    client.set,
                    client.get,
                    lambda names: client.delete(*names),
                )

            c, r = interleave(s.reps, [candidate, raw])
            mib = s.blob / MiB
            row.value = mib / ctx.summary(c)
            row.baseline_value = mib / ctx.summary(r)
        finally:
            client.close()
            with contextlib.suppress(Exception):
                storage.close()
