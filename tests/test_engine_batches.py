"""ttl expiry and the reap of a dead process are the engine's rule on every
backend that runs on it: MemoryStorage and DirectoryStorage end the leases
through :meth:`blobleases.engine.Engine.end_leases` (the verbs of
:class:`blobleases.engine.BatchEnds`), and then retain or delete the content
alike; PostgresStorage reaps a dead process's leases so too (its ttl expiry
runs through :meth:`~blobleases.engine.Engine.expire`). tests/test_engine.py
checks the same rule over a dict adapter."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blobleases import BlobStorage, LeaseId
from blobleases.directory import DirectoryStorage
from blobleases.engine import Engine
from blobleases.memory import MemoryStorage


def _opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., BlobStorage]]:
    opened: list[BlobStorage] = []

    def open_storage(**policies: Any) -> BlobStorage:
        if request.param == "memory":
            storage: BlobStorage = MemoryStorage(**policies)
        elif request.param == "directory":
            storage = DirectoryStorage(tmp_path / f"s{len(opened)}", **policies)
        else:
            from blobleases.postgres_storage import PostgresStorage

            server = request.getfixturevalue("postgres_server")
            storage = PostgresStorage(
                server.dsn,
                blobs=str(tmp_path / "blobs"),
                namespace=f"b-{uuid.uuid4().hex[:12]}",
                **policies,
            )
        opened.append(storage)
        return storage

    yield open_storage
    for storage in opened:
        storage.close()


@pytest.fixture(params=["memory", "directory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., BlobStorage]]:
    yield from _opener(request, tmp_path)


@pytest.fixture(
    params=["memory", "directory", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def make_any(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., BlobStorage]]:
    yield from _opener(request, tmp_path)


@pytest.fixture
def ended(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, LeaseId]]:
    """Every lease the engine's batch verb ends, as (content id, lease id)
    (a backend's batch may hold a lease id as its text)."""
    seen: list[tuple[str, LeaseId]] = []
    original = Engine.end_leases

    def spy(self: Engine[Any], a: Any, batch: list[tuple[Any, LeaseId]]) -> int:
        seen.extend((str(key), LeaseId.parse(str(lid))) for key, lid in batch)
        return original(self, a, batch)

    monkeypatch.setattr(Engine, "end_leases", spy)
    return seen


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("retain_bytes", [0, 1 << 20])
def test_expired_ttl_leases_end_through_the_engine(
    make: Callable[..., BlobStorage], ended: list[tuple[str, LeaseId]], retain_bytes: int
) -> None:
    storage = make(retain_bytes=retain_bytes, reap_interval=3600.0)
    short, kept, other = LeaseId.new(), LeaseId.new(), LeaseId.new()
    gone = storage.store_bytes(b"only a ttl lease", short, ttl=0.01)
    shared = storage.store_bytes(b"a ttl lease and a plain one", kept, ttl=0.01)
    storage.lease_by_content(shared, other)
    time.sleep(0.05)  # both ttls have run out (expiry is a lower bound)
    report = storage.collect()
    assert report.leases_reaped == 2
    assert sorted(ended) == sorted([(str(gone), short), (str(shared), kept)])
    assert storage.contains(shared)  # still leased by ``other``
    if retain_bytes:
        assert storage.contains(gone) and storage.stat(gone).lease_count == 0
        assert storage.stats().retained_bytes == len(b"only a ttl lease")
    else:
        assert not storage.contains(gone)
    assert not storage.verify()


def test_a_dead_processes_leases_end_through_the_engine(
    make_any: Callable[..., BlobStorage], ended: list[tuple[str, LeaseId]]
) -> None:
    storage = make_any(reap_interval=3600.0)
    pid = _dead_pid()
    dead, detached, mine = LeaseId.new(pid), LeaseId.new(pid), LeaseId.new()
    orphan = storage.store_bytes(b"leased by a dead process", dead)
    both = storage.store_bytes(b"and by this one", dead)
    storage.lease_by_content(both, mine)
    kept = storage.store_bytes(b"detached: outlives it", detached, detached=True)
    report = storage.collect()
    assert report.leases_reaped == 2
    assert sorted(ended) == sorted([(str(orphan), dead), (str(both), dead)])
    assert not storage.contains(orphan)
    assert storage.contains(both) and storage.contains(kept)
    assert not storage.verify()
