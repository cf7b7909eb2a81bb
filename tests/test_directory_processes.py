"""DirectoryStorage across real processes: dead holders are reaped, leases
travel through multiprocessing (issue 4, acceptance 2 and 5)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from blobleases import BlobLease, BlobManager, ContentId, LeaseId, get_storage, register_storage
from blobleases.directory import DirectoryStorage
from blobleases.testing import blob

# == acceptance 2: a child holding 10,000 leases and open readers dies ======================

_HOLDER = textwrap.dedent(
    """
    import sys
    from blobleases import ContentId, LeaseId
    from blobleases.directory import DirectoryStorage

    root, shared_text, leases = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage = DirectoryStorage(root, reap_interval=3600)
    shared = ContentId.parse(shared_text)
    first = {}
    for i in range(20):
        lid = LeaseId.new()
        cid = storage.store_bytes((b"child-%d-" % i) * 1000, lid)
        first[cid] = lid
    lid = LeaseId.new()
    storage.lease_by_content(shared, lid)
    first[shared] = lid
    ids = list(first)
    for n in range(leases - len(ids)):
        storage.lease_by_content(ids[n % len(ids)], LeaseId.new())
    readers = [storage.get_reader(cid, lid) for cid, lid in first.items()]
    for cid in ids:
        print(cid, flush=True)
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "exit":
        import os
        os._exit(0)  # no cleanup at all: as if it crashed
    sys.stdin.read()  # until SIGKILL
    """
)


@pytest.mark.parametrize(
    ("death", "reaper"), [("exit", "interval"), ("sigkill", "interval"), ("sigkill", "collect")]
)
def test_dead_holder_of_10000_leases_is_reaped(tmp_path: Path, death: str, reaper: str) -> None:
    interval = 0.5 if reaper == "interval" else 3600.0
    storage = DirectoryStorage(tmp_path / "s", reap_interval=interval)
    shared_data = blob(50_000, 1)
    mine = LeaseId.new()
    shared = storage.store_bytes(shared_data, mine)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(storage.root), str(shared), "10000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        lines = []
        while (line := child.stdout.readline()) not in ("ready\n", ""):
            lines.append(line.strip())
        assert line == "ready\n", "the child failed before it was ready"
        theirs = [ContentId.parse(text) for text in lines if text != str(shared)]
        assert len(theirs) == 20
        # The parent leases one of the child's blobs by content id: it must stay.
        kept = theirs[0]
        kept_lid = LeaseId.new()
        storage.lease_by_content(kept, kept_lid)
        assert storage.get_data(kept, kept_lid) == b"child-0-" * 1000
        stats = storage.stats()
        assert stats.leases == 10000 + 2 and stats.readers == 21 and stats.processes == 2
        if death == "exit":
            child.stdin.write("exit\n")
            child.stdin.flush()
        else:
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    if reaper == "collect":
        report = storage.collect()
        assert report.leases_reaped == 10000 and report.readers_reaped == 21
        assert report.processes_reaped == 1 and report.blobs_deleted == 19
    else:
        time.sleep(interval + 0.05)
        storage.contains(shared)  # one operation reaps
    assert [i for i in storage.iter_leases() if i.pid == child.pid] == []
    stats = storage.stats()
    assert (stats.leases, stats.readers, stats.blobs, stats.processes) == (2, 0, 2, 1)
    for cid in theirs[1:]:
        assert not storage.contains(cid)
        assert not storage.blob_path(cid).exists()
    assert storage.get_data(shared, mine) == shared_data
    assert storage.get_data(kept, kept_lid) == b"child-0-" * 1000
    assert not storage.verify()
    storage.close()


_STORER = textwrap.dedent(
    """
    import os, sys
    from blobleases import LeaseId
    from blobleases.directory import DirectoryStorage

    storage = DirectoryStorage(sys.argv[1], reap_interval=3600)
    cid = storage.store_bytes(os.urandom(300_000), LeaseId.new())
    print(cid, flush=True)
    """
)


def test_child_stores_parent_leases_by_content_id(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "s", reap_interval=3600)
    result = subprocess.run(
        [sys.executable, "-c", _STORER, str(storage.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cid = ContentId.parse(result.stdout.strip())
    # The child exited with its lease unclosed: a reap ends it, unless the
    # parent leases the content first.
    lid = LeaseId.new()
    storage.lease_by_content(cid, lid)
    data = storage.get_data(cid, lid)
    assert ContentId.for_bytes(data) == cid and len(data) == 300_000
    storage.collect()
    assert [i.lease_id for i in storage.iter_leases()] == [lid]
    assert storage.get_data(cid, lid) == data
    storage.advise_lease_dropped(lid, cid)
    assert not storage.contains(cid)
    storage.close()


# == acceptance 5: leases through multiprocessing ===========================================


def _describe(lease: Any) -> str:
    """What a worker reports about a lease it received: a hash of its bytes,
    the store it is registered with, its pid. Closes the lease."""
    assert isinstance(lease, BlobLease)
    try:
        digest = hashlib.sha256(lease.get_data()).hexdigest()
        return f"{digest} {get_storage().url} {os.getpid()}"
    finally:
        lease.close()


def _receive(payload: Any) -> str:
    lease = pickle.loads(payload) if isinstance(payload, bytes) else payload
    return _describe(lease)


def _queue_worker(inbox: Any, outbox: Any) -> None:
    while True:
        item = inbox.get()
        if item is None:
            return
        outbox.put(_receive(item))


def _expected(storage: DirectoryStorage, data: bytes) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), storage.url


@pytest.fixture
def registered(tmp_path: Path) -> Any:
    storage = DirectoryStorage(tmp_path / "s")
    register_storage(storage)
    yield storage
    storage.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_lease_through_process_pool(registered: DirectoryStorage, method: str) -> None:
    manager = BlobManager(registered)
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        first = manager.store(blob(100_000, 2))
        sent_ticket = pool.submit(_receive, first.transfer())
        first.close()  # right after submit: the transfer lease keeps the bytes
        second = manager.store(blob(100_000, 3))
        pickled = pickle.dumps(second)
        second.close()
        sent_pickle = pool.submit(_receive, pickled)
        for future, data in ((sent_ticket, blob(100_000, 2)), (sent_pickle, blob(100_000, 3))):
            digest, url, pid = future.result(timeout=120).split()
            assert (digest, url) == _expected(registered, data)
            assert int(pid) != os.getpid()
    # the workers' own leases are closed, and loading ended the transfer leases
    assert list(registered.iter_leases()) == []
    assert registered.stats().blobs == 0
    assert not registered.verify()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_lease_through_queue(registered: DirectoryStorage, method: str) -> None:
    manager = BlobManager(registered)
    context = multiprocessing.get_context(method)
    inbox, outbox = context.Queue(), context.Queue()
    worker = context.Process(target=_queue_worker, args=(inbox, outbox))
    worker.start()
    try:
        first = manager.store(blob(70_000, 4))
        inbox.put(first.transfer())
        first.close()  # the queue pickles in a feeder thread, later
        second = manager.store(blob(70_000, 5))
        inbox.put(pickle.dumps(second))
        second.close()
        for data in (blob(70_000, 4), blob(70_000, 5)):
            digest, url, pid = outbox.get(timeout=120).split()
            assert (digest, url) == _expected(registered, data)
            assert int(pid) == worker.pid
        inbox.put(None)
        worker.join(timeout=60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert not registered.verify()


def test_spawned_worker_with_nothing_registered_opens_the_store(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "s")  # not registered anywhere
    lease = BlobManager(storage).store(blob(10_000, 6))
    ticket = lease.transfer()
    lease.close()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        digest, url, _pid = pool.submit(_receive, ticket).result(timeout=120).split()
    assert (digest, url) == _expected(storage, blob(10_000, 6))
    storage.close()


# == store racing delete of the same content =================================================

_CHURNER = textwrap.dedent(
    """
    import sys, time
    from blobleases import ContentId, LeaseId
    from blobleases.directory import DirectoryStorage

    storage = DirectoryStorage(sys.argv[1])
    data = bytes(range(256)) * 400
    cid = ContentId.for_bytes(data)
    deadline = time.monotonic() + float(sys.argv[2])
    rounds = 0
    while time.monotonic() < deadline:
        lid = LeaseId.new()
        storage.store(cid, data, lid)
        if storage.get_data(cid, lid) != data:
            sys.exit("wrong bytes")
        with storage.get_reader(cid, lid) as reader:
            if reader.read() != data:
                sys.exit("wrong bytes from a reader")
        storage.advise_lease_dropped(lid, cid)
        rounds += 1
    print(rounds)
    """
)


def test_stores_racing_deletes_of_the_same_content_never_lose_it(tmp_path: Path) -> None:
    """Each process stores, reads and drops one blob in a loop, so the last
    drop of one process (deleting the blob) races the store of another
    (deduplicating against it, or writing it again): a held lease must
    always read its bytes, and nothing may be left over."""
    storage = DirectoryStorage(tmp_path / "s")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHURNER, str(storage.root), "2.0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert int(out) > 0
    storage.collect()
    assert storage.stats().blobs == 0
    assert [p for p in storage.root.rglob("*") if p.is_file() and "blobs" in p.parts] == []
    assert os.listdir(storage.root / "tmp") == []
    assert not storage.verify()
    storage.close()
