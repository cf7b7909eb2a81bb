"""Four processes store, lease, read and drop the same contents in one
PostgresStorage (S3 tier) and are SIGKILLed at random points, round after
round: no leased byte is lost (the test's own leases stay readable), and
after ``collect()`` no row, upload, deletion or object is left over."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from blobleases import ContentId, LeaseId
from blobleases.postgres_storage import PostgresStorage
from pg_fixtures import BUCKET, s3_environment
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres

_WORKER = textwrap.dedent(
    """
    import random, sys
    from blobleases import ContentId, LeaseId, LeaseExpired, ContentNotFound
    from blobleases.postgres_storage import PostgresStorage

    dsn, blobs, namespace, seed = sys.argv[1:5]
    rng = random.Random(int(seed))
    store = PostgresStorage(dsn, blobs=blobs, namespace=namespace)
    datas = [bytes([k]) * (20_000 + 1000 * k) for k in range(8)]
    held = []
    print("ready", flush=True)
    while True:
        k = rng.randrange(8)
        action = rng.random()
        if action < 0.35:
            lid = LeaseId.new()
            store.store(ContentId.for_bytes(datas[k]), datas[k], lid)
            held.append((ContentId.for_bytes(datas[k]), lid, k))
        elif action < 0.55:
            lid = LeaseId.new()
            try:
                store.lease_by_content(ContentId.for_bytes(datas[k]), lid)
                held.append((ContentId.for_bytes(datas[k]), lid, k))
            except ContentNotFound:
                pass
        elif action < 0.75 and held:
            cid, lid, k = held[rng.randrange(len(held))]
            assert store.get_data(cid, lid) == datas[k]
            with store.get_reader(cid, lid) as r:
                assert r.read(10) == datas[k][:10]
        elif held:
            cid, lid, k = held.pop(rng.randrange(len(held)))
            store.advise_lease_dropped(lid, cid)
    """
)


def test_sigkill_torture_loses_nothing_and_leaks_nothing(
    postgres_server: PostgresServer, s3_server: S3Server
) -> None:
    namespace = f"x-{uuid.uuid4().hex[:12]}"
    blobs = f"s3://{BUCKET}/{namespace}?endpoint={s3_server.endpoint}"
    rng = random.Random(15)
    datas = [bytes([k]) * (20_000 + 1000 * k) for k in range(8)]
    with s3_environment():
        storage = PostgresStorage(postgres_server.dsn, blobs=blobs, namespace=namespace)
        try:
            # the survivor: leases on half of the contents for the whole run
            mine: list[tuple[ContentId, LeaseId, int]] = []
            for k in range(0, 8, 2):
                lid = LeaseId.new()
                mine.append((storage.store_bytes(datas[k], lid), lid, k))
            for round_ in range(2):
                workers = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            _WORKER,
                            postgres_server.dsn,
                            blobs,
                            namespace,
                            str(round_ * 10 + i),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for i in range(4)
                ]
                for w in workers:
                    assert w.stdout is not None and w.stdout.readline().strip() == "ready"
                for w in rng.sample(workers, len(workers)):
                    time.sleep(rng.uniform(0.05, 0.4))
                    assert w.poll() is None, "a worker failed on its own"
                    w.send_signal(signal.SIGKILL)
                for w in workers:
                    w.wait()
                for cid, lid, k in mine:
                    assert storage.get_data(cid, lid) == datas[k]
            storage.collect()
            for cid, lid, k in mine:
                assert storage.get_data(cid, lid) == datas[k]
            assert sorted(str(c) for c in storage.iter_content()) == sorted(
                str(c) for c, _, _ in mine
            )
            assert {(i.content_id, i.lease_id) for i in storage.iter_leases()} == {
                (c, lid) for c, lid, _ in mine
            }
            for table in ("holds", "uploads", "deleting"):
                assert storage._exec(f"SELECT count(*) FROM {table}")[0][0] == 0, table
            keys = sorted(k for k, _ in storage.tier.list_keys())
            assert keys == sorted(storage.tier.key(c) for c, _, _ in mine)
            assert not storage.verify()
            for cid, lid, _ in mine:
                storage.advise_lease_dropped(lid, cid)
            storage.collect()
            assert not list(storage.iter_content())
            assert not list(storage.tier.list_keys())
        finally:
            storage.close()
