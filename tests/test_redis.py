"""RedisStorage on real servers: hosts that die, servers that restart, hang
or drop connections, and a 200 MiB blob read in bounded memory."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blobleases import (
    ContentId,
    ContentNotFound,
    IntegrityError,
    LeaseExpired,
    LeaseId,
    StorageError,
    StoreFull,
    open_storage,
)
from blobleases.redis_storage import RedisStorage
from blobleases.testing import blob, wait_until
from redis_fixtures import started
from redis_servers import RedisServer

pytestmark = pytest.mark.redis


def _namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _keys_of(storage: RedisStorage, cid: ContentId) -> list[bytes]:
    """Every key of one content (its hash tag) in the storage's namespace."""
    return list(storage.client.scan_iter(match=f"{storage.namespace}:{{{cid}}}:*"))


@pytest.fixture(params=["standalone", "cluster"])
def any_url(request: pytest.FixtureRequest) -> str:
    """The url of the shared standalone server, then of the cluster."""
    fixture = "redis_server" if request.param == "standalone" else "redis_cluster"
    return str(request.getfixturevalue(fixture).url)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private standalone server (these tests stop and restart it)."""
    with started(lambda: RedisServer(tmp_path / "redis"), lambda s: s.stop(kill=True)) as server:
        yield server


@pytest.fixture
def persistent_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server with an append-only file fsynced at every write."""
    with started(
        lambda: RedisServer(tmp_path / "redis-aof", persistence=True), lambda s: s.stop(kill=True)
    ) as server:
        yield server


# == Acceptance 2: two hosts, one SIGKILLed ============================================

_HOST_PROGRAM = r"""
import sys
from blobleases import ContentId, LeaseId
from blobleases.redis_storage import RedisStorage

url, namespace, host = sys.argv[1:4]
storage = RedisStorage(url, namespace=namespace, host_id=host, heartbeat_ttl=3.0,
                       reap_interval=0.1)
for line in sys.stdin:
    words = line.split()
    if words[0] == "store":
        data = bytes.fromhex(words[1]) * int(words[2])
        lid = LeaseId.new()
        cid = storage.store_bytes(data, lid)
        print(cid, lid, flush=True)
    elif words[0] == "lease":
        lid = LeaseId.new()
        storage.lease_by_content(ContentId.parse(words[1]), lid)
        print(lid, flush=True)
    elif words[0] == "read":
        data = storage.get_data(ContentId.parse(words[1]), LeaseId.parse(words[2]))
        print(ContentId.for_bytes(data), flush=True)
    elif words[0] == "collect":
        print(storage.collect().leases_reaped, flush=True)
"""


class _Host:
    """A process standing for one host (its own host id) using the store."""

    def __init__(self, url: str, namespace: str, host: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOST_PROGRAM, url, namespace, host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, line: str) -> list[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"host process died answering {line!r}"
        return answer.split()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def test_two_hosts_one_killed(any_url: str) -> None:
    namespace = _namespace()
    a = _Host(any_url, namespace, "host-a")
    b = _Host(any_url, namespace, "host-b")
    observer = RedisStorage(any_url, namespace=namespace, host_id="observer")
    try:
        shared_text, a_shared = a.ask("store 0a0b0c 5000")
        unshared_text, _ = a.ask("store 0d0e0f 7000")
        shared, unshared = ContentId.parse(shared_text), ContentId.parse(unshared_text)
        (b_lease,) = b.ask(f"lease {shared}")
        assert b.ask(f"read {shared} {b_lease}") == [shared_text]
        assert len(list(observer.iter_leases())) == 3
        a_pid = a.process.pid
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        # Host a's leases go once its heartbeat lapses: any client reaps them.
        assert wait_until(lambda: not observer.contains(unshared), timeout=30)
        assert wait_until(lambda: all(i.pid != a_pid for i in observer.iter_leases()), timeout=30)
        observer.collect()
        assert observer.contains(shared)
        assert b.ask(f"read {shared} {b_lease}") == [shared_text]
        with pytest.raises(LeaseExpired):
            observer.get_data(shared, LeaseId.parse(a_shared))
        assert [i.lease_id for i in observer.iter_leases()] == [LeaseId.parse(b_lease)]
        assert not observer.verify()
    finally:
        a.close()
        b.close()
        observer.close()


def test_local_dead_process_reaped_without_waiting_for_heartbeat(any_url: str) -> None:
    """On the same host, a dead pid is seen dead at once (its start time)."""
    namespace = _namespace()
    host = _Host(any_url, namespace, "same-host")
    storage = RedisStorage(any_url, namespace=namespace, host_id="same-host", heartbeat_ttl=60)
    try:
        cid_text, _ = host.ask("store 01 100")
        host.process.kill()
        host.process.wait()
        report = storage.collect()
        assert report.leases_reaped == 1 and report.processes_reaped == 1
        assert not storage.contains(ContentId.parse(cid_text))
    finally:
        host.close()
        storage.close()


def test_forked_child_keeps_its_own_heartbeat(redis_server: RedisServer) -> None:
    storage = RedisStorage(redis_server.url, namespace=_namespace(), heartbeat_ttl=1.0)
    try:
        cid = storage.store_bytes(b"parent", LeaseId.new())
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by exit code
            code = 1
            try:
                lid = LeaseId.new()
                child_cid = storage.store_bytes(b"child", lid)
                hb = storage.client.exists(storage._hb_key(storage._owner(os.getpid())))
                ok = storage.get_data(child_cid, lid) == b"child" and storage.contains(cid)
                storage.advise_lease_dropped(lid, child_cid)
                code = 0 if ok and hb else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert not storage.contains(ContentId.for_bytes(b"child"))
        assert not storage.verify()
    finally:
        storage.close()


def test_forked_child_works_on_connections_of_its_own(redis_server: RedisServer) -> None:
    """A forked child using an inherited RedisStorage talks to the server over
    connections it opened itself (none that the parent had at the fork), its
    leases are its own process's (reaped once it is gone), and the parent's
    connections still work after the child exits."""
    storage = RedisStorage(redis_server.url, namespace=_namespace())
    try:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"parent bytes", lid)
        parents = {c["id"] for c in storage.client.client_list()}
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by exit code
            code = 1
            try:
                mine, child_lid = LeaseId.new(), LeaseId.new()
                storage.lease_by_content(cid, mine)
                child_cid = storage.store_bytes(b"child bytes", child_lid)
                with storage.get_reader(cid, mine) as reader:
                    ok = reader.read() == b"parent bytes"
                ok = ok and storage.get_data(child_cid, child_lid) == b"child bytes"
                code = 0 if ok and str(storage.client.client_id()) not in parents else 2
            finally:
                os._exit(code)  # leaves its leases to be reaped
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert storage.get_data(cid, lid) == b"parent bytes"
        report = storage.collect()
        assert report.leases_reaped == 2 and report.processes_reaped == 1
        assert not storage.contains(ContentId.for_bytes(b"child bytes"))
        assert storage.contains(cid) and not storage.verify()
    finally:
        storage.close()


# == Acceptance 3: the server restarts, drops connections, does not answer ===============


def test_restart_without_persistence_reports_loss(own_server: RedisServer) -> None:
    storage = RedisStorage(own_server.url, namespace=_namespace(), chunk_size=4096)
    try:
        data = blob(20_000, 1)
        lid = LeaseId.new()
        cid = storage.store_bytes(data, lid)
        reader = storage.get_reader(cid, lid)
        assert reader.read(100) == data[:100]
        own_server.restart(kill=True)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)
        with pytest.raises(LeaseExpired):
            reader.read()  # the rest of the blob is gone: never wrong bytes
        reader.close()
        with pytest.raises(ContentNotFound):
            storage.lease_by_content(cid, LeaseId.new())
        # The store works again (scripts reloaded, connections renewed).
        lid2 = LeaseId.new()
        assert storage.store_bytes(data, lid2) == cid
        assert storage.get_data(cid, lid2) == data
        assert not storage.verify()
    finally:
        storage.close()


def test_restart_with_persistence_keeps_leased_content(persistent_server: RedisServer) -> None:
    namespace = _namespace()
    storage = RedisStorage(
        persistent_server.url, namespace=namespace, chunk_size=4096, durability="safe"
    )
    try:
        data = blob(50_000, 2)
        lid = LeaseId.new()
        cid = storage.store_bytes(data, lid)
        persistent_server.restart(kill=True)
        assert storage.get_data(cid, lid) == data
        with storage.get_reader(cid, lid) as reader:
            reader.seek(40_000)
            assert reader.read(100) == data[40_000:40_100]
        storage.advise_lease_dropped(lid, cid)
        assert not storage.contains(cid)
        assert not storage.verify()
    finally:
        storage.close()


class _GatedFile(io.BytesIO):
    """A seekable file that, on the second pass (store_file hashes first,
    then uploads), stops before its ``stop_at``-th read until ``go`` is set."""

    def __init__(self, data: bytes, stop_at: int) -> None:
        super().__init__(data)
        self.second_pass = False
        self.reads = 0
        self.stop_at = stop_at
        self.reached = threading.Event()
        self.go = threading.Event()

    def seek(self, pos: int, whence: int = io.SEEK_SET, /) -> int:
        if self.tell() > 0:
            self.second_pass = True
        return super().seek(pos, whence)

    def read(self, size: int | None = -1, /) -> bytes:
        if self.second_pass:
            self.reads += 1
            if self.reads == self.stop_at:
                self.reached.set()
                self.go.wait(60)
        return super().read(size)


def _store_in_thread(
    storage: RedisStorage, source: _GatedFile, lid: LeaseId
) -> tuple[threading.Thread, list[BaseException | None]]:
    outcome: list[BaseException | None] = []

    def store() -> None:
        try:
            storage.store_file(source, lid)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=store)
    thread.start()
    assert source.reached.wait(60), "the upload did not start"
    return thread, outcome


def test_server_killed_mid_store_leaves_nothing_after_collect(
    persistent_server: RedisServer,
) -> None:
    """The server dies while chunks are being written: the store fails with
    StorageError; after a restart no partial blob is visible and collect()
    removes the staged chunks."""
    storage = RedisStorage(
        persistent_server.url, namespace=_namespace(), chunk_size=64 * 1024, socket_timeout=2
    )
    data = os.urandom(64 * 1024 * 20)
    cid = ContentId.for_bytes(data)
    source = _GatedFile(data, stop_at=6)
    try:
        thread, outcome = _store_in_thread(storage, source, LeaseId.new())
        persistent_server.stop(kill=True)
        source.go.set()
        thread.join(60)
        assert not thread.is_alive() and len(outcome) == 1
        assert isinstance(outcome[0], StorageError), outcome[0]
        assert outcome[0].__cause__ is not None
        persistent_server.start()
        assert not storage.contains(cid)
        staged = _keys_of(storage, cid)
        assert len(staged) == 5, "the AOF kept the five chunks staged before the kill"
        assert all(b":staging:" in key for key in staged)
        report = storage.collect()
        assert report.rows_removed >= len(staged)
        assert _keys_of(storage, cid) == []
        assert not storage.verify()
        stats = storage.stats()
        assert (stats.blobs, stats.bytes, stats.leases) == (0, 0, 0)
    finally:
        source.go.set()
        storage.close()


def test_connections_killed_mid_store(own_server: RedisServer) -> None:
    """CLIENT KILL of every connection while a store is half done: redis-py
    reconnects (two retries) and the store completes, or it fails with
    StorageError; either way no partial blob is visible and collect() leaves
    nothing behind."""
    storage = RedisStorage(own_server.url, namespace=_namespace(), chunk_size=64 * 1024)
    killer = RedisStorage(own_server.url, namespace=storage.namespace)
    try:
        for seed in range(3):
            data = blob(64 * 1024 * 12 + seed, seed)
            cid = ContentId.for_bytes(data)
            lid = LeaseId.new()
            source = _GatedFile(data, stop_at=4)
            try:
                thread, outcome = _store_in_thread(storage, source, lid)
                killer.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            finally:
                source.go.set()
            thread.join(60)
            assert not thread.is_alive() and len(outcome) == 1
            if outcome[0] is None:
                assert storage.get_data(cid, lid) == data
                storage.advise_lease_dropped(lid, cid)
            else:
                assert isinstance(outcome[0], StorageError), outcome[0]
                assert not storage.contains(cid)
            storage.collect()
            assert not storage.contains(cid)
            assert _keys_of(storage, cid) == []
        assert not storage.verify()
    finally:
        storage.close()
        killer.close()


def test_silent_listener_gives_storage_error() -> None:
    """A socket that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        with pytest.raises(StorageError, match="cannot reach redis") as info:
            RedisStorage(f"redis://127.0.0.1:{port}", socket_timeout=0.5)
        assert info.value.__cause__ is not None


def test_stopped_server_gives_storage_error_then_recovers(own_server: RedisServer) -> None:
    storage = RedisStorage(own_server.url, namespace=_namespace(), socket_timeout=0.5)
    try:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"still here", lid)
        own_server.pause()
        try:
            with pytest.raises(StorageError) as info:
                storage.get_data(cid, lid)
            assert info.value.__cause__ is not None
            with pytest.raises(StorageError):
                storage.store_bytes(b"not stored", LeaseId.new())
        finally:
            own_server.resume()
        assert storage.get_data(cid, lid) == b"still here"
        assert not storage.contains(ContentId.for_bytes(b"not stored"))
        assert not storage.verify()
    finally:
        storage.close()


def test_unreachable_server_gives_storage_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageError):
        RedisStorage(f"redis://127.0.0.1:{port}", socket_timeout=0.5)


# == Acceptance 4: a 200 MiB blob in bounded client memory ================================


def test_200_mib_blob_streams_in_bounded_memory(redis_server: RedisServer, tmp_path: Path) -> None:
    chunk = 4 << 20
    size = 200 << 20
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size // (1 << 20)):
            part = hashlib.sha256(i.to_bytes(4, "little")).digest() * (1 << 15)
            digest.update(part)
            f.write(part)
    expected = ContentId("sha256", digest.digest())
    storage = RedisStorage(redis_server.url, namespace=_namespace(), chunk_size=chunk)
    try:
        lid = LeaseId.new()
        tracemalloc.start()
        try:
            cid = storage.store_file(path, lid)
            assert cid == expected
            with storage.get_reader(cid, lid) as reader, open(path, "rb") as f:
                assert reader.size == size
                for offset in (0, 5, chunk - 3, 77 * chunk + 1234, size - 10, 3 * chunk):
                    reader.seek(offset)
                    f.seek(offset)
                    assert reader.read(1 << 20) == f.read(1 << 20)
                reader.seek(0)
                whole = hashlib.sha256()
                while block := reader.read(chunk):
                    whole.update(block)
                assert whole.digest() == expected.digest
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 6 * chunk, f"peak client allocation {peak} bytes"
        assert storage.stat(cid).size == size
        storage.advise_lease_dropped(lid, cid)
        assert not storage.contains(cid)
        assert _keys_of(storage, cid) == []
    finally:
        storage.close()


# == Urls, namespaces, the extra ===========================================================


def test_url_keeps_namespace_and_password_and_repr_hides_it(redis_server: RedisServer) -> None:
    storage = RedisStorage(redis_server.url, namespace="ns-1")
    try:
        assert storage.url == f"{redis_server.url}?namespace=ns-1"
        again = open_storage(storage.url)
        try:
            assert isinstance(again, RedisStorage) and again.namespace == "ns-1"
        finally:
            again.close()
    finally:
        storage.close()
    default = RedisStorage(redis_server.url)
    try:
        assert default.url == redis_server.url
    finally:
        default.close()
    with pytest.raises(StorageError) as info:
        RedisStorage(redis_server.url.replace("//", "//user:secret@"))
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"namespace": "a b"}, ValueError, "namespace"),
        ({"chunk_size": 10}, ValueError, "chunk_size"),
        ({"chunk_size": "big"}, TypeError, "chunk_size"),
        ({"heartbeat_ttl": 0}, ValueError, "heartbeat_ttl"),
        ({"host_id": "a/b"}, ValueError, "host_id"),
    ],
)
def test_bad_arguments_name_themselves(
    redis_server: RedisServer, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        RedisStorage(redis_server.url, **kwargs)


def test_core_package_imports_without_redis() -> None:
    program = (
        "import sys; sys.modules['redis'] = None\n"
        "import blobleases\n"
        "try:\n"
        "    blobleases.RedisStorage\n"
        "except ImportError as exc:\n"
        "    assert 'blobleases[redis]' in str(exc), exc\n"
        "    print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_keys_lost_by_redis_are_detected(redis_server: RedisServer) -> None:
    """Keys Redis itself drops (eviction under maxmemory, a lost replica) give
    IntegrityError or LeaseExpired, never wrong bytes; verify() reports them
    and repair() removes what is left."""
    storage = RedisStorage(redis_server.url, namespace=_namespace(), chunk_size=4096)
    try:
        chunkless = blob(10_000, 3)
        lid1 = LeaseId.new()
        cid1 = storage.store_bytes(chunkless, lid1)
        metaless = blob(10_000, 4)
        lid2 = LeaseId.new()
        cid2 = storage.store_bytes(metaless, lid2)
        storage.client.delete(storage._chunk_keys_for_tests(cid1)[1])
        storage.client.delete(f"{storage.namespace}:{{{cid2}}}:meta")
        with pytest.raises(IntegrityError):
            storage.get_data(cid1, lid1)
        with storage.get_reader(cid1, lid1) as reader:
            assert reader.read(4096) == chunkless[:4096]
            with pytest.raises(IntegrityError):
                reader.read(4096)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid2, lid2)
        report = storage.verify()
        assert report.corrupted == [cid1]
        assert any(str(cid2) in key for key in report.orphaned)
        assert storage.verify(repair=True).repaired
        with pytest.raises(LeaseExpired):
            storage.get_data(cid1, lid1)
        storage.collect()
        assert not storage.verify()
        stats = storage.stats()
        assert (stats.blobs, stats.bytes, stats.leases) == (0, 0, 0)
    finally:
        storage.close()


# == Many processes, one SIGKILLed mid-work ===================================================

_WORKER_PROGRAM = r"""
import random, sys
from blobleases import ContentId, ContentNotFound, LeaseId
from blobleases.redis_storage import RedisStorage
from blobleases.testing import blob

url, namespace, host, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
storage = RedisStorage(url, namespace=namespace, host_id=host, heartbeat_ttl=3.0,
                       reap_interval=0.2, chunk_size=16 * 1024)
payloads = [blob(n, k) for k, n in enumerate((10, 5000, 16 * 1024, 40_000, 100_000, 70_001))]
ids = [ContentId.for_bytes(p) for p in payloads]
rng = random.Random(seed)
held = []
for op in range(200):
    if op % 10 == 0:
        print("op", op, flush=True)
    k = rng.randrange(len(ids))
    x = rng.random()
    if x < 0.35:
        lid = LeaseId.new()
        storage.store(ids[k], payloads[k], lid)
        held.append((ids[k], lid))
    elif x < 0.5:
        lid = LeaseId.new()
        try:
            storage.lease_by_content(ids[k], lid)
            held.append((ids[k], lid))
        except ContentNotFound:
            pass
    elif x < 0.7 and held:
        cid, lid = held.pop(rng.randrange(len(held)))
        storage.advise_lease_dropped(lid, cid)
    elif x < 0.85 and held:
        cid, lid = rng.choice(held)
        with storage.get_reader(cid, lid) as reader:
            reader.seek(rng.randrange(max(reader.size, 1)))
            reader.read(20_000)
            reader.seek(0)
            assert ContentId.for_bytes(reader.read()) == cid
    elif x < 0.9:
        storage.collect()
    elif held:
        cid, lid = rng.choice(held)
        assert ContentId.for_bytes(storage.get_data(cid, lid)) == cid
print("done", len(held), flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        bad = [str(c) for c, l in held if ContentId.for_bytes(storage.get_data(c, l)) != c]
        print("checked", len(held), *bad, flush=True)
    elif line.strip() == "drop":
        for cid, lid in held:
            storage.advise_lease_dropped(lid, cid)
        print("dropped", flush=True)
        break
"""


def test_processes_on_two_hosts_one_killed_mid_work(any_url: str) -> None:
    namespace = _namespace()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER_PROGRAM, any_url, namespace, host, str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed, host in enumerate(("h1", "h1", "h2", "h2"))
    ]
    observer = RedisStorage(any_url, namespace=namespace, host_id="observer")
    victim, survivors = workers[0], workers[1:]
    try:
        assert victim.stdout is not None
        while (line := victim.stdout.readline()) and line.strip() != "op 100":
            pass
        assert line.strip() == "op 100", "the victim failed before op 100"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for worker in survivors:
            assert worker.stdout is not None
            while (line := worker.stdout.readline()) and not line.startswith("done"):
                pass
            assert line.startswith("done"), "a worker failed"
        assert wait_until(
            lambda: all(i.pid != victim.pid for i in observer.iter_leases()), timeout=30
        )
        observer.collect()
        for worker in survivors:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write("check\n")
            worker.stdin.flush()
            answer = worker.stdout.readline().split()
            assert answer[:1] == ["checked"] and len(answer) == 2, answer
        assert not observer.verify()
        for worker in survivors:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write("drop\n")
            worker.stdin.flush()
            assert worker.stdout.readline().strip() == "dropped"
            worker.wait(30)
        observer.collect()
        stats = observer.stats()
        assert (stats.blobs, stats.bytes, stats.leases, stats.readers) == (0, 0, 0, 0)
        assert not observer.verify()
        leftovers = [
            k
            for k in observer.client.scan_iter(match=f"{namespace}:{{sha256-*")
            if not k.endswith(b":m")
        ]
        assert leftovers == []
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            for stream in (worker.stdin, worker.stdout):
                if stream is not None:
                    stream.close()
        observer.close()


def test_keys_of_one_blob_share_one_cluster_slot(redis_cluster: Any) -> None:
    storage = RedisStorage(redis_cluster.url, namespace=_namespace(), chunk_size=4096)
    try:
        data = blob(50_000, 5)
        lid = LeaseId.new()
        cid = storage.store_bytes(data, lid)
        with storage.get_reader(cid, lid) as reader:
            keys = _keys_of(storage, cid)
            assert len(keys) >= 3 + 13  # meta, leases, readers and 13 chunks
            slots = {storage.client.keyslot(key) for key in keys}
            assert len(slots) == 1
            assert reader.read() == data
    finally:
        storage.close()


def test_store_full_after_a_concurrent_store_took_the_room_evicts_nothing(
    any_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 3: StoreFull changes nothing, even when another client's store
    takes the room between this store's eviction plan and its eviction."""
    namespace = _namespace()
    policies: dict[str, Any] = {"max_bytes": 10_000, "on_full": "evict"}
    a = RedisStorage(any_url, namespace=namespace, **policies)
    b = RedisStorage(any_url, namespace=namespace, **policies)
    try:
        v = ContentId.for_bytes(blob(4000, 1))
        lv = LeaseId.new()
        b.store(v, blob(4000, 1), lv)  # evictable
        k = ContentId.for_bytes(blob(3000, 2))
        lk = LeaseId.new()
        b.store(k, blob(3000, 2), lk)
        w = ContentId.for_bytes(blob(3000, 3))
        lw = LeaseId.new()
        readers = [b.get_reader(k, lk)]
        plan = a._plan_eviction

        def plan_then_b_stores(need: int) -> list[tuple[str, str]] | None:
            victims = plan(need)
            if not b.contains(w):  # b fills the room v would free, and reads it
                b.store(w, blob(3000, 3), lw)
                readers.append(b.get_reader(w, lw))
            return victims

        monkeypatch.setattr(a, "_plan_eviction", plan_then_b_stores)
        new = blob(6000, 4)
        with pytest.raises(StoreFull):
            a.store(ContentId.for_bytes(new), new, LeaseId.new())
        assert a.contains(v), "a failed store evicted content"
        assert b.get_data(v, lv) == blob(4000, 1)
        assert a.stats().bytes == 10_000
        for reader in readers:
            reader.close()
    finally:
        a.close()
        b.close()
