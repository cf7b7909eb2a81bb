"""Row 9: RedisStorage against raw redis-py SET/GET on the same server."""

from __future__ import annotations

import contextlib
import itertools
import os
import time

from blobleases import BlobLease, BlobManager, BlobStorage

from .backends import redis_server, redis_storage_class
from .harness import Context, MiB, Target, interleave, no_gc, size_text
from .rows_local import UniqueBlobs

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
        keys = itertools.count()
        try:

            def candidate() -> float:
                batch = blobs.make(s.redis_batch)
                leases: list[BlobLease] = []
                with no_gc():
                    t0 = time.perf_counter()
                    for b in batch:
                        lease = mgr.store(b)
                        lease.get_data()
                        leases.append(lease)
                    elapsed = time.perf_counter() - t0
                for lease in leases:
                    lease.close()
                return elapsed / len(batch)

            def raw() -> float:
                batch = blobs.make(s.redis_batch)
                names: list[str] = []
                with no_gc():
                    t0 = time.perf_counter()
                    for b in batch:
                        key = f"raw:{next(keys)}"
                        client.set(key, b)
                        client.get(key)
                        names.append(key)
                    elapsed = time.perf_counter() - t0
                client.delete(*names)
                return elapsed / len(batch)

            c, r = interleave(s.reps, [candidate, raw])
            mib = s.blob / MiB
            row.value = mib / ctx.summary(c)
            row.baseline_value = mib / ctx.summary(r)
        finally:
            client.close()
            with contextlib.suppress(Exception):
                storage.close()
