"""Handing a lease to another process (SPEC section 1, issue 11 parts 2, 3
and 5): single-use tickets free the bytes with their last real holder,
loading a stale ticket never breaks a pool, and closing a handle (or
interpreter exit) frees content whose leases expired.

Real child processes, real pools (fork and spawn), DirectoryStorage on a
path and on shm://, MemoryStorage and RedisStorage where they apply.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import blobleases
from blobleases import (
    BlobLease,
    BlobManager,
    ContentId,
    LeaseExpired,
    LeaseId,
    LeaseTicket,
    MemoryStorage,
    StoreFull,
    register_storage,
)
from blobleases.directory import DirectoryStorage
from blobleases.directory import storage as directory_module
from blobleases.storage import BlobStorage
from blobleases.testing import blob, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
METHODS = ["fork", "spawn"]
MIB = 1 << 20


# == helpers ==================================================================================


def _digest_and_close(lease: BlobLease) -> str:
    """The pool worker: hash the bytes of the lease it received, closing it
    before returning (the pool drops a task's arguments only after it has
    sent the result)."""
    with lease:
        return hashlib.sha256(lease.get_data()).hexdigest()


def _try(lease: BlobLease) -> str:
    """Use a received lease; the error's message if it holds nothing."""
    try:
        return _digest_and_close(lease)
    except LeaseExpired as exc:
        return f"LeaseExpired: {exc}"


def _store_in_worker(n: int) -> BlobLease:
    """A forked worker stores into the (inherited) registered storage and
    returns the lease, which is pickled back to the caller."""
    return blobleases.store(b"made in a worker %d" % n)


def _pid(_: object) -> int:
    return os.getpid()


def _unique(n: int, size: int) -> bytes:
    """``size`` bytes, distinct for each ``n``, cheap to make."""
    return n.to_bytes(8, "little") * (size // 8)


@pytest.fixture(params=["path", "shm"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DirectoryStorage]:
    """A registered DirectoryStorage on a path or on shm:// (removed after)."""
    if request.param == "path":
        storage = DirectoryStorage(tmp_path / "store")
    else:
        if not os.path.isdir("/dev/shm"):
            pytest.skip("shm:// needs /dev/shm, which this machine lacks")
        storage = DirectoryStorage.shared_memory(f"test-tickets-{uuid.uuid4().hex[:12]}")
    register_storage(storage)
    try:
        yield storage
    finally:
        root = storage.root
        storage.close()
        if request.param == "shm":
            shutil.rmtree(root, ignore_errors=True)


def _index_rows(root: Path, table: str) -> int:
    """Rows of one index table, read without the storage (so nothing expires
    or reaps on the way)."""
    db = sqlite3.connect(f"file:{root / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def _stale_by_drop(storage: BlobStorage, data: bytes) -> LeaseTicket:
    """A ticket whose content was freed before it was loaded (its transfer
    lease dropped, as a collect of the store or an eviction would)."""
    lease = BlobManager(storage).store(data)
    ticket = lease.transfer()
    lease.close()
    storage.advise_lease_dropped(LeaseId.parse(ticket.transfer_lease_id), lease.content_id)
    assert not storage.contains(lease.content_id)
    return ticket


def _stale_by_expiry(storage: BlobStorage, data: bytes) -> LeaseTicket:
    """A ticket whose transfer lease expired (made through a second handle of
    the same store with a short transfer_ttl)."""
    with blobleases.open_storage(storage.url, transfer_ttl=0.2) as quick:
        lease = BlobManager(quick).store(data)
        ticket = lease.transfer()
        lease.close()
        (info,) = [i for i in quick.iter_leases() if str(i.lease_id) == ticket.transfer_lease_id]
    assert ticket.url == storage.url and info.expires_at is not None
    expires_at = info.expires_at
    assert wait_until(lambda: time.time() > expires_at + 0.01)
    return ticket


# == acceptance 1: the bytes go with the last lease, no transfer_ttl to wait for ================


def _readme_pool_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "ProcessPoolExecutor" in b]
    return example


@pytest.mark.parametrize("method", METHODS)
def test_readme_process_pool_example_frees_the_bytes_at_once(tmp_path: Path, method: str) -> None:
    example = _readme_pool_example()
    assert 'if __name__ == "__main__":' in example and "with lease:" in example
    name = f"test-readme-{uuid.uuid4().hex[:12]}"
    script = example.replace("shm://example", f"shm://{name}").replace(
        'if __name__ == "__main__":\n',
        'if __name__ == "__main__":\n'
        f"    import multiprocessing; multiprocessing.set_start_method({method!r})\n",
    )
    path = tmp_path / "example.py"
    path.write_text(script)
    try:
        out = subprocess.run(
            [sys.executable, str(path)], capture_output=True, text=True, timeout=120
        )
    finally:
        shutil.rmtree(f"/dev/shm/blobleases-{os.geteuid()}/{name}", ignore_errors=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10000000", "0"]


def _pipeline(storage: DirectoryStorage, pool: Any, submit: Any, items: int) -> None:
    manager = BlobManager(storage)
    pending = []
    for n in range(items):
        data = _unique(n, 8 * MIB)
        lease = manager.store(data)
        pending.append((submit(pool, lease.transfer()), hashlib.sha256(data).hexdigest()))
        lease.close()  # at once: the ticket's transfer lease holds the bytes
    for result, digest in pending:
        assert result(timeout=120) == digest
    # the workers closed their leases: nothing holds anything any more
    stats = storage.stats()
    assert (stats.blobs, stats.bytes, stats.leases) == (0, 0, 0)
    assert list(storage.iter_leases()) == []


def _executor_submit(pool: ProcessPoolExecutor, ticket: LeaseTicket) -> Any:
    return pool.submit(_digest_and_close, ticket).result


def _mp_submit(pool: Any, ticket: LeaseTicket) -> Any:
    return pool.apply_async(_digest_and_close, (ticket,)).get


@pytest.mark.parametrize("method", METHODS)
def test_32_x_8_mib_through_process_pool_executor(shared: DirectoryStorage, method: str) -> None:
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        _pipeline(shared, pool, _executor_submit, 32)
    assert not shared.verify()


@pytest.mark.parametrize("method", METHODS)
def test_32_x_8_mib_through_multiprocessing_pool(shared: DirectoryStorage, method: str) -> None:
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        _pipeline(shared, pool, _mp_submit, 32)
    assert not shared.verify()


@pytest.mark.parametrize("method", METHODS)
def test_stream_with_16_mib_in_use_never_fills_512_mib(tmp_path: Path, method: str) -> None:
    """At most two 8 MiB blobs are in use at any time; 80 go through a store
    with max_bytes=512 MiB (room for 64). Pinned handoffs would fill it."""
    root = f"test-stream-{uuid.uuid4().hex[:12]}"
    storage = DirectoryStorage.shared_memory(root, max_bytes=512 * MIB)
    register_storage(storage)
    manager = BlobManager(storage)
    context = multiprocessing.get_context(method)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            previous: Any = None
            for n in range(80):
                data = _unique(n, 8 * MIB)
                try:
                    lease = manager.store(data)
                except StoreFull as exc:
                    pytest.fail(f"item {n}: {exc} ({storage.stats()})")
                future = pool.submit(_digest_and_close, lease.transfer())
                lease.close()
                if previous is not None:
                    assert previous[0].result(timeout=120) == previous[1]
                previous = (future, hashlib.sha256(data).hexdigest())
            assert previous[0].result(timeout=120) == previous[1]
        assert storage.stats().blobs == 0
    finally:
        path = storage.root
        storage.close()
        shutil.rmtree(path, ignore_errors=True)


# == acceptance 2: a stale ticket fails its task, never the pool ================================


@pytest.mark.parametrize("stale_by", ["drop", "expiry"])
@pytest.mark.parametrize("method", METHODS)
def test_stale_ticket_fails_one_executor_task(
    shared: DirectoryStorage, method: str, stale_by: str
) -> None:
    make_stale = _stale_by_drop if stale_by == "drop" else _stale_by_expiry
    manager = BlobManager(shared)
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = []
        for n in range(20):
            data = blob(50_000, 1000 + n)
            if n == 7:
                ticket = make_stale(shared, data)
            else:
                lease = manager.store(data)
                ticket = lease.transfer()
                lease.close()
            futures.append((pool.submit(_digest_and_close, ticket), data))
        for n, (future, data) in enumerate(futures):
            if n == 7:
                with pytest.raises(
                    LeaseExpired, match="expired" if stale_by == "expiry" else "freed"
                ):
                    future.result(timeout=120)
            else:
                assert future.result(timeout=120) == hashlib.sha256(data).hexdigest()
        # the pool keeps working
        lease = manager.store(b"after the stale ticket")
        after = pool.submit(_digest_and_close, lease.transfer())
        lease.close()
        assert after.result(timeout=120) == hashlib.sha256(b"after the stale ticket").hexdigest()
    assert shared.stats().blobs == 0


@pytest.mark.parametrize("method", METHODS)
def test_stale_ticket_fails_one_multiprocessing_task(shared: DirectoryStorage, method: str) -> None:
    manager = BlobManager(shared)
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        results = []
        for n in range(20):
            data = blob(50_000, 2000 + n)
            if n == 11:
                ticket = _stale_by_drop(shared, data)
            else:
                lease = manager.store(data)
                ticket = lease.transfer()
                lease.close()
            results.append((pool.apply_async(_digest_and_close, (ticket,)), data))
        for n, (result, data) in enumerate(results):
            if n == 11:
                with pytest.raises(LeaseExpired, match="freed"):
                    result.get(timeout=120)  # no hang: the task is not lost
            else:
                assert result.get(timeout=120) == hashlib.sha256(data).hexdigest()
        # map still works after it
        leases = [manager.store(blob(1000, 3000 + n)) for n in range(4)]
        tickets = [lease.transfer() for lease in leases]
        for lease in leases:
            lease.close()
        got = pool.map_async(_digest_and_close, tickets).get(timeout=120)
        assert got == [hashlib.sha256(blob(1000, 3000 + n)).hexdigest() for n in range(4)]
    assert shared.stats().blobs == 0


@pytest.mark.parametrize("method", METHODS)
def test_memory_ticket_in_another_process_says_process_local(method: str) -> None:
    storage = MemoryStorage()
    register_storage(storage)
    lease = blobleases.store(b"only here")
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        answer = pool.submit(_try, lease.transfer()).result(timeout=120)
        assert answer.startswith("LeaseExpired") and "memory:// is process-local" in answer
        future = pool.submit(_digest_and_close, lease.transfer())
        with pytest.raises(LeaseExpired, match="memory:// is process-local"):
            future.result(timeout=120)
        assert pool.submit(_pid, None).result(timeout=120) != os.getpid()  # still working
    # in this process the same ticket loads
    ticket = lease.transfer()
    lease.close()
    loaded = pickle.loads(pickle.dumps(ticket))
    assert loaded.storage is storage and loaded.get_data() == b"only here"
    loaded.close()
    # the two tickets the workers could not load keep their transfer leases
    # until transfer_ttl, as any ticket never loaded does
    left = list(storage.iter_leases())
    assert len(left) == 2 and all(i.detached and i.expires_at for i in left)


def test_memory_lease_returned_from_a_forked_worker_does_not_break_the_pool() -> None:
    storage = MemoryStorage()
    register_storage(storage)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        returned = pool.submit(_store_in_worker, 1).result(timeout=120)
        assert isinstance(returned, BlobLease)
        assert returned.content_id == ContentId.for_bytes(b"made in a worker 1")
        assert returned.size == len(b"made in a worker 1")
        for use in (returned.get_data, returned.get_reader, returned.clone, returned.transfer):
            with pytest.raises(LeaseExpired, match="memory:// is process-local"):
                use()
        returned.close()  # a no-op
        assert pool.submit(_pid, None).result(timeout=120) != os.getpid()
        again = pool.submit(_store_in_worker, 2).result(timeout=120)
        with pytest.raises(LeaseExpired, match="process-local"):
            again.get_data()
    assert storage.stats().blobs == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_memory_ticket_in_a_forked_child_gives_the_failing_lease() -> None:
    storage = MemoryStorage()
    lease = BlobManager(storage).store(b"parent only")
    ticket = lease.transfer()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = b"loaded"
        try:
            child = ticket.load()
            try:
                child.get_data()
            except LeaseExpired as exc:
                message = str(exc).encode()
        finally:
            os.write(write, message)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    assert "memory:// is process-local" in message
    lease.close()
    # the child's copy never touched ours: the ticket still loads here
    loaded = ticket.load()
    assert loaded.get_data() == b"parent only"
    loaded.close()


def test_store_that_cannot_be_opened_gives_the_failing_lease(tmp_path: Path) -> None:
    lease = BlobManager(DirectoryStorage(tmp_path / "s")).store(b"abc")
    ticket = lease.transfer()
    lease.close()
    lease.storage.close()
    bad = LeaseTicket(
        ticket.content_id,
        "file://" + str(tmp_path / "not-a-store-file"),
        3,
        ticket.transfer_lease_id,
    )
    (tmp_path / "not-a-store-file").write_text("a file, not a directory")
    loaded = pickle.loads(pickle.dumps(bad))
    assert loaded.content_id == lease.content_id and loaded.size == 3
    with pytest.raises(LeaseExpired, match="cannot open the store"):
        loaded.get_data()
    with pytest.raises(LeaseExpired, match="cannot open the store"):
        _ = loaded.storage
    loaded.close()


def test_lease_expired_travels_between_processes() -> None:
    exc = LeaseExpired("why", lease_id=LeaseId.new(), content_id=ContentId.for_bytes(b"x"))
    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == "why" and back.lease_id == exc.lease_id
    assert back.content_id == exc.content_id


# == acceptance 3: taking over is one step ========================================================

_LOADER = textwrap.dedent(
    """
    import pickle, sys
    from blobleases.directory import DirectoryStorage

    ticket = pickle.loads(bytes.fromhex(sys.stdin.readline()))  # the transfer lease's ticket
    store = DirectoryStorage(sys.argv[1])
    print(ticket.get_data().decode(), ticket.lease_id, flush=True)
    print(" ".join(str(i.lease_id) for i in store.iter_leases()), flush=True)
    sys.stdin.readline()  # hold the lease until told
    ticket.close()
    print("closed", flush=True)
    """
)


def test_load_in_another_process_replaces_the_transfer_lease(shared: DirectoryStorage) -> None:
    lease = BlobManager(shared).store(b"handed-over")
    ticket = lease.transfer()
    (transfer,) = [i for i in shared.iter_leases() if i.lease_id != lease.lease_id]
    assert str(transfer.lease_id) == ticket.transfer_lease_id and transfer.detached
    lease.close()
    child = subprocess.Popen(
        [sys.executable, "-c", _LOADER, str(shared.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(pickle.dumps(ticket).hex() + "\n")
        child.stdin.flush()
        data, child_lease = child.stdout.readline().split()
        assert data == "handed-over"
        assert child.stdout.readline().split() == [child_lease]  # no transfer lease
        infos = list(shared.iter_leases())
        assert [(str(i.lease_id), i.detached, i.expires_at) for i in infos] == [
            (child_lease, False, None)
        ]
        # the used ticket loads again while the child holds the content
        again = ticket.load()
        assert again.get_data() == b"handed-over"
        again.close()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "closed\n"
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.wait()
    assert shared.stats().blobs == 0
    # nobody holds it now: the used ticket gives the failing lease
    gone = ticket.load()
    with pytest.raises(LeaseExpired, match="freed"):
        gone.get_data()
    gone.close()


class _DefaultTakeOver(MemoryStorage):
    """A backend without its own take-over: BlobStorage's default, with the
    calls it makes recorded."""

    _take_over_lease = BlobStorage._take_over_lease

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, LeaseId, bool]] = []

    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        size = super()._lease_by_content(cid, lid, ttl, detached)
        self.calls.append(("lease", lid, self._contains(cid)))
        return size

    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        super()._advise_lease_dropped(lid, cid)
        self.calls.append(("drop", lid, self._contains(cid)))


def test_default_take_over_never_frees_the_content_in_between() -> None:
    storage = _DefaultTakeOver()
    lease = BlobManager(storage).store(b"third-party backend")
    ticket = lease.transfer()
    lease.close()
    storage.calls.clear()
    received = ticket.load()
    old = LeaseId.parse(ticket.transfer_lease_id)
    # the receiver's lease first, then the transfer lease: present throughout
    assert storage.calls == [("lease", received.lease_id, True), ("drop", old, True)]
    assert [i.lease_id for i in storage.iter_leases()] == [received.lease_id]
    received.close()
    assert storage.stats().blobs == 0
    gone = ticket.load()
    with pytest.raises(LeaseExpired, match="freed"):
        gone.get_data()


@pytest.mark.redis
def test_redis_load_replaces_the_transfer_lease(redis_server: Any) -> None:
    from blobleases.redis_storage import RedisStorage

    storage = RedisStorage(redis_server.url, namespace=f"t-{uuid.uuid4().hex[:12]}")
    try:
        register_storage(storage)
        lease = BlobManager(storage).store(blob(100_000, 7))
        ticket = lease.transfer()
        lease.close()
        assert [str(i.lease_id) for i in storage.iter_leases()] == [ticket.transfer_lease_id]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            digest = pool.submit(_digest_and_close, ticket).result(timeout=120)
            assert digest == hashlib.sha256(blob(100_000, 7)).hexdigest()
            assert storage.stats().blobs == 0  # freed with the worker's lease
            with pytest.raises(LeaseExpired, match="freed"):
                pool.submit(_digest_and_close, ticket).result(timeout=120)
        loaded = ticket.load()
        with pytest.raises(LeaseExpired, match="freed"):
            loaded.get_data()
        # one load holds exactly the receiver's lease
        lease = BlobManager(storage).store(b"two holders")
        ticket = lease.transfer()
        received = ticket.load()
        assert {i.lease_id for i in storage.iter_leases()} == {lease.lease_id, received.lease_id}
        lease.close()
        second = ticket.load()  # used, but received still holds the content
        assert second.get_data() == b"two holders"
        second.close()
        received.close()
        assert storage.stats().blobs == 0
        assert not storage.verify()
    finally:
        storage.close()


# == acceptance 4: closing a handle (or exiting) frees content whose leases expired =============


def test_close_frees_expired_content(tmp_path: Path) -> None:
    root = tmp_path / "s"
    storage = DirectoryStorage(root)
    lease = BlobManager(storage).store(blob(100_000, 8), ttl=0.2)
    path = storage.blob_path(lease.content_id)
    (info,) = storage.iter_leases()
    expires_at = info.expires_at
    assert expires_at is not None
    assert wait_until(lambda: time.time() > expires_at + 0.01)  # no operation meanwhile
    assert path.exists() and _index_rows(root, "content") == 1
    storage.close()
    assert not path.exists()  # before any other handle looks
    assert _index_rows(root, "content") == 0 and _index_rows(root, "leases") == 0
    with DirectoryStorage(root) as again:
        assert again.stats().blobs == 0
        assert not again.verify()


def test_close_ends_a_bounded_number_of_expired_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(directory_module, "_CLOSE_EXPIRE_LIMIT", 3)
    root = tmp_path / "s"
    storage = DirectoryStorage(root)
    for n in range(5):
        storage.store_bytes(blob(1000, 50 + n), LeaseId.new(), ttl=0.2)
    latest = max(i.expires_at or 0.0 for i in storage.iter_leases())
    assert wait_until(lambda: time.time() > latest + 0.01)
    storage.close()
    assert _index_rows(root, "leases") == 2 and _index_rows(root, "content") == 2
    with DirectoryStorage(root) as again:
        assert again.stats().blobs == 0  # the next operation ends the rest
        assert not again.verify()


_EXPIRE_AND_EXIT = textwrap.dedent(
    """
    import sys, time
    import blobleases
    from blobleases import BlobManager

    store = blobleases.open_storage(sys.argv[1])
    lease = BlobManager(store).store(b"expires before exit" * 1000, ttl=0.2, detached=True)
    (info,) = store.iter_leases()
    while time.time() <= info.expires_at + 0.01:
        time.sleep(0.01)
    print(lease.content_id, flush=True)
    # exit with the handle open and no further operation
    """
)


def test_interpreter_exit_frees_expired_content(shared: DirectoryStorage) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _EXPIRE_AND_EXIT, shared.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cid = ContentId.parse(out.stdout.strip())
    assert not shared.blob_path(cid).exists()
    assert _index_rows(shared.root, "content") == 0
    assert shared.stats().blobs == 0


@pytest.mark.redis
def test_redis_close_and_exit_free_expired_content(redis_server: Any) -> None:
    from blobleases.redis_storage import RedisStorage

    namespace = f"t-{uuid.uuid4().hex[:12]}"
    url = f"{redis_server.url}?namespace={namespace}" if "?" not in redis_server.url else None
    assert url is not None
    storage = RedisStorage(redis_server.url, namespace=namespace)
    lease = BlobManager(storage).store(b"expires" * 1000, ttl=0.2, detached=True)
    meta = f"{namespace}:{{{lease.content_id}}}:meta"
    (info,) = storage.iter_leases()
    expires_at = info.expires_at
    assert expires_at is not None
    assert wait_until(lambda: time.time() > expires_at + 0.01)
    client = storage.client
    assert client.exists(meta)
    storage.close()
    import redis

    raw = redis.Redis.from_url(redis_server.url)
    try:
        assert not raw.exists(meta)  # freed by close(), before any other client looks
        out = subprocess.run(
            [sys.executable, "-c", _EXPIRE_AND_EXIT, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        cid = ContentId.parse(out.stdout.strip())
        assert not raw.exists(f"{namespace}:{{{cid}}}:meta")  # freed at the child's exit
    finally:
        raw.close()
    with RedisStorage(redis_server.url, namespace=namespace) as again:
        assert again.stats().blobs == 0
        assert not again.verify()


# == pickling a closed lease, and the failing lease's rules ======================================


def test_pickling_a_closed_or_failing_lease_raises(shared: DirectoryStorage) -> None:
    lease = BlobManager(shared).store(b"soon closed")
    ticket = lease.transfer()
    lease.close()
    with pytest.raises(LeaseExpired, match="closed"):
        pickle.dumps(lease)
    received = ticket.load()
    received.close()
    failing = ticket.load()
    assert failing.content_id == lease.content_id and failing.size == len(b"soon closed")
    assert "holding nothing" in repr(failing)
    with pytest.raises(LeaseExpired, match="freed"):
        pickle.dumps(failing)
    failing.close()
    failing.close()
    assert shared.stats().leases == 0
