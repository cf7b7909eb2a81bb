"""Interleavings of PostgresStorage's threads forced one step at a time (the
tier is wrapped so a thread stops at a chosen call until released)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from blobleases import ContentId, LeaseId
from blobleases.postgres_storage import PostgresStorage
from pg_servers import PostgresServer

pytestmark = pytest.mark.postgres


class _GatedTier:
    """The store's tier, except that ``delete`` called from the thread named
    ``gated`` stops (``reached`` set) until ``release`` is set."""

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.gated: str | None = None
        self.reached = threading.Event()
        self.release = threading.Event()

    def delete(self, key: str) -> None:
        if threading.current_thread().name == self.gated:
            self.gated = None
            self.reached.set()
            assert self.release.wait(60), "never released"
        self.tier.delete(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tier, name)


def test_a_collect_never_finishes_a_deletion_another_thread_is_making(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Thread A dropped the last lease: its transaction removed the row and
    recorded the deletion, and A is about to delete the object. A collect()
    on another thread must leave that deletion to A; before the fix it took
    it for a failed one of this process, finished it and removed the
    ``deleting`` row, so a store of the same content put its object at once
    and A's delete then removed the object of a leased blob."""
    data = b"deleted by one thread, collected by another, stored by a third"
    storage = PostgresStorage(
        postgres_server.dsn,
        blobs=str(tmp_path / "blobs"),
        namespace=f"r-{uuid.uuid4().hex[:12]}",
        lock_timeout=30,
    )
    gate = _GatedTier(storage._tier)
    storage._tier = gate  # type: ignore[assignment]
    errors: list[BaseException] = []

    def run(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            errors.append(exc)

    try:
        first = LeaseId.new()
        cid = storage.store_bytes(data, first)
        gate.gated = "deleter"
        deleter = threading.Thread(
            target=run, args=(storage.advise_lease_dropped, first, cid), name="deleter"
        )
        deleter.start()
        assert gate.reached.wait(60)
        # A is between its commit and the object's deletion
        storage.collect()
        pending = storage._exec("SELECT count(*) FROM deleting WHERE cid = %s", (str(cid),))
        assert pending == [(1,)], "collect() finished a deletion still in flight"
        second = LeaseId.new()
        storer = threading.Thread(target=run, args=(storage.store_bytes, data, second))
        storer.start()
        gate.release.set()
        deleter.join()
        storer.join()
        assert not errors, errors
        assert ContentId.for_bytes(storage.get_data(cid, second)) == cid
        assert not storage.verify()
        storage.advise_lease_dropped(second, cid)
        storage.collect()
        assert storage.stats().blobs == 0
        assert not list(storage.tier.list_keys())
    finally:
        gate.release.set()
        storage.close()
