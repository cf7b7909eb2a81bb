"""Rows 17: PostgresStorage against raw clients on the same servers.

17a: store+get of a 16 MiB blob through PostgresStorage with the S3 tier
vs a raw boto3 PUT+GET of the same bytes on the same SeaweedFS; 17b: lease
acquire+drop pairs vs a raw psycopg INSERT transaction and DELETE
transaction on the same PostgreSQL. The servers are those the test suite
starts (tests/pg_servers.py), on loopback.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import uuid
from typing import Any

from blobleases import BlobManager, LeaseId

from .harness import Context, KiB, MiB, Target, Unavailable, interleave, per_op, size_text
from .workloads import lease_pairs, put_get, store_get

__all__ = ["postgres_rows"]

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _servers() -> tuple[Any, Any]:
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    try:
        import pg_servers
    except ImportError as exc:
        raise Unavailable(f"tests/pg_servers.py cannot be imported ({exc})") from exc
    try:
        pg = pg_servers.PostgresServer()
    except pg_servers.ServerUnavailable as exc:
        raise Unavailable(f"PostgreSQL cannot be started ({exc})") from exc
    try:
        s3 = pg_servers.S3Server()
        s3.create_bucket("bench")
    except pg_servers.ServerUnavailable as exc:
        pg.close()
        raise Unavailable(f"SeaweedFS cannot be started ({exc})") from exc
    os.environ["AWS_ACCESS_KEY_ID"] = pg_servers.ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = pg_servers.SECRET_KEY
    return pg, s3


def postgres_rows(ctx: Context) -> None:
    tiny = ctx.sizes.mode == "tiny"
    size = 256 * KiB if tiny else 16 * MiB
    batch = 1 if ctx.sizes.mode != "full" else 3
    pairs = 30 if tiny else (300 if ctx.sizes.mode == "quick" else 2000)
    store_row = ctx.row(
        f"17a store+get {size_text(size)}, PostgresStorage (S3 tier), store+get_data",
        "MiB/s",
        "boto3 PUT+GET, same SeaweedFS",
        Target(">=", 0.8),
    )
    lease_row = ctx.row(
        "17b lease acquire+drop, PostgresStorage",
        "pairs/s",
        "psycopg INSERT tx + DELETE tx, same PostgreSQL",
        Target(">=", 0.7),
    )
    try:
        import boto3
        import psycopg
        from botocore.config import Config

        from blobleases.postgres_storage import PostgresStorage
    except ImportError as exc:
        raise Unavailable(f"PostgresStorage is not available ({exc})") from exc
    pg, s3 = _servers()
    namespace = f"bench{os.getpid()}"
    storage = None
    raw_db = None
    try:
        storage = PostgresStorage(
            pg.dsn, blobs=f"s3://bench/{namespace}?endpoint={s3.endpoint}", namespace=namespace
        )
        raw_s3 = boto3.client(
            "s3",
            endpoint_url=s3.endpoint,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        mgr = BlobManager(storage)
        keys = (f"raw/{n}" for n in itertools.count())

        def fresh() -> list[bytes]:
            return [uuid.uuid4().bytes * (size // 16) for _ in range(batch)]

        def put(key: str, data: bytes) -> None:
            raw_s3.put_object(Bucket="bench", Key=key, Body=data)

        def get(key: str) -> None:
            raw_s3.get_object(Bucket="bench", Key=key)["Body"].read()

        def delete(names: list[str]) -> None:
            for key in names:
                raw_s3.delete_object(Bucket="bench", Key=key)

        def candidate() -> float:
            return store_get(mgr, fresh())

        def raw() -> float:
            return put_get(fresh(), keys, put, get, delete)

        c, r = interleave(ctx.sizes.reps, [candidate, raw])
        store_row.value = size / MiB / ctx.summary(c)
        store_row.baseline_value = size / MiB / ctx.summary(r)

        holder = LeaseId.new()
        cid = storage.store_bytes(b"lease benchmark content", holder)
        lids = [LeaseId.new() for _ in range(pairs)]
        raw_db = psycopg.connect(pg.dsn, autocommit=True)
        raw_db.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw(cid text, lid text, PRIMARY KEY (cid, lid))"
        )

        def raw_pairs() -> float:
            assert raw_db is not None
            text = str(cid)

            def run() -> None:
                for lid in lids:
                    with raw_db.transaction():
                        raw_db.execute("INSERT INTO bench_raw VALUES (%s, %s)", (text, str(lid)))
                    with raw_db.transaction():
                        raw_db.execute(
                            "DELETE FROM bench_raw WHERE cid = %s AND lid = %s", (text, str(lid))
                        )

            return per_op(len(lids), run)

        c, r = interleave(ctx.sizes.reps, [lambda: lease_pairs(storage, cid, lids), raw_pairs])
        lease_row.value = 1 / ctx.summary(c)
        lease_row.baseline_value = 1 / ctx.summary(r)
    finally:
        if raw_db is not None:
            with contextlib.suppress(Exception):
                raw_db.close()
        if storage is not None:
            with contextlib.suppress(Exception):
                storage.close()
        s3.close()
        pg.close()
