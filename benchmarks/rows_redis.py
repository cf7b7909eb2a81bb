"""Row 9: RedisStorage against raw redis-py SET/GET on the same server."""

from __future__ import annotations

import contextlib
import itertools
import os

from blobleases import BlobLease, BlobManager, BlobStorage

from .backends import redis_server, redis_storage_class
from .harness import Context, MiB, Target, UniqueBlobs, interleave, per_op, size_text

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

                def run() -> None:
                    for b in batch:
                        lease = mgr.store(b)
                        lease.get_data()
                        leases.append(lease)

                per = per_op(len(batch), run)
                for lease in leases:
                    lease.close()
                return per

            def raw() -> float:
                batch = blobs.make(s.redis_batch)
                names: list[str] = []

                def run() -> None:
                    for b in batch:
                        key = f"raw:{next(keys)}"
                        client.set(key, b)
                        client.get(key)
                        names.append(key)

                per = per_op(len(batch), run)
                client.delete(*names)
                return per

            c, r = interleave(s.reps, [candidate, raw])
            mib = s.blob / MiB
            row.value = mib / ctx.summary(c)
            row.baseline_value = mib / ctx.summary(r)
        finally:
            client.close()
            with contextlib.suppress(Exception):
                storage.close()
