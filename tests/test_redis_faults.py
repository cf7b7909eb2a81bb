"""RedisStorage under faults, on real servers: readers whose blob was lost
and stored again with another chunk size, a server at maxmemory, unix socket
urls, and bad input that must give named errors (issue 12 items 6 to 9)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blobleases import ContentId, LeaseExpired, LeaseId, StorageError, StoreFull, open_storage
from blobleases.redis_storage import RedisStorage
from blobleases.testing import wait_until
from cli_runs import one_error_line, run_cli
from redis_fixtures import started
from redis_servers import RedisServer

pytestmark = pytest.mark.redis


def _namespace() -> str:
    return f"f-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private standalone server (these tests flush it or fill it)."""
    with started(lambda: RedisServer(tmp_path / "redis"), lambda s: s.stop(kill=True)) as server:
        yield server


def _drop_namespace(storage: RedisStorage) -> None:
    """Delete every key of the storage's namespace, as a FLUSHALL would (on a
    shared cluster, where flushing would hit other tests' keys)."""
    keys = list(storage.client.scan_iter(match=f"{storage.namespace}:*"))
    for key in keys:
        storage.client.delete(key)


# == Item 6: a reader whose blob was lost and stored again =================================

_SIZE = 20_000


def _offsets() -> list[int]:
    """Offsets in every chunk of a 4 KiB layout, and at its chunk borders."""
    return [0, 100, 1000, 4095, 4096, 4100, 5000, 8192, 9000, 12_300, 16_384, 19_000]


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_reader_never_reads_the_layout_of_a_later_store(
    where: str, request: pytest.FixtureRequest
) -> None:
    """An open reader's keys are flushed (FLUSHALL on a private server), then
    the same content is stored again from another handle with a smaller
    chunk size: every read of the old reader raises LeaseExpired, never
    returns bytes of the new layout."""
    server: Any = request.getfixturevalue(
        "own_server" if where == "standalone" else "redis_cluster"
    )
    namespace = _namespace()
    data = os.urandom(_SIZE)
    old = RedisStorage(server.url, namespace=namespace, chunk_size=4096)
    new = RedisStorage(server.url, namespace=namespace, chunk_size=1024)
    try:
        lid = LeaseId.new()
        cid = old.store_bytes(data, lid)
        reader = old.get_reader(cid, lid)
        reader.seek(4100)
        assert reader.read(100) == data[4100:4200]
        if where == "standalone":
            old.client.flushall()
        else:
            _drop_namespace(old)
        lid2 = LeaseId.new()
        assert new.store_bytes(data, lid2) == cid
        for offset in _offsets():
            for length in (1, 100, 900, 5000):
                reader.seek(offset)
                with pytest.raises(LeaseExpired):
                    got = reader.read(length)
                    pytest.fail(
                        f"read {length} at {offset} returned "
                        f"{'wrong' if got != data[offset : offset + length] else 'right'} bytes"
                    )
        reader.close()
        # The new blob is intact and readable through its own lease.
        assert new.get_data(cid, lid2) == data
        with new.get_reader(cid, lid2) as fresh:
            fresh.seek(4100)
            assert fresh.read(100) == data[4100:4200]
        new.advise_lease_dropped(lid2, cid)
        new.collect()
        assert not new.contains(cid)
        assert not new.verify()
    finally:
        old.close()
        new.close()


_READER_PROGRAM = r"""
import sys
from blobleases import ContentId, LeaseId
from blobleases.redis_storage import RedisStorage

url, namespace, hex_data = sys.argv[1:4]
data = bytes.fromhex(hex_data)
storage = RedisStorage(url, namespace=namespace, host_id="stopped-host", heartbeat_ttl=1.0,
                       chunk_size=4096)
lid = LeaseId.new()
cid = storage.store_bytes(data, lid)
reader = storage.get_reader(cid, lid)
reader.seek(4100)
assert reader.read(100) == data[4100:4200]
print("ready", cid, flush=True)
sys.stdin.readline()
results = []
for offset in (0, 4100, 9000, 16_384):
    reader.seek(offset)
    try:
        got = reader.read(100)
    except Exception as exc:
        results.append(type(exc).__name__)
    else:
        results.append("right" if got == data[offset : offset + 100] else "WRONG")
print(*results, flush=True)
"""


def test_stopped_reader_reaped_then_restored_never_reads_wrong_bytes(
    own_server: RedisServer,
) -> None:
    """A process holding a reader is SIGSTOPped past its heartbeat ttl and
    reaped by another host; the content is stored again with a smaller chunk
    size; after SIGCONT its reads raise LeaseExpired, never wrong bytes."""
    namespace = _namespace()
    data = os.urandom(_SIZE)
    child = subprocess.Popen(
        [sys.executable, "-c", _READER_PROGRAM, own_server.url, namespace, data.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    other = RedisStorage(own_server.url, namespace=namespace, host_id="other-host", chunk_size=1024)
    try:
        assert child.stdin is not None and child.stdout is not None
        words = child.stdout.readline().split()
        assert words[:1] == ["ready"], "the reader process failed"
        cid = ContentId.parse(words[1])
        child.send_signal(signal.SIGSTOP)
        try:
            # Its heartbeat lapses; any client then reaps its lease and reader.
            assert wait_until(lambda: (other.collect(), not other.contains(cid))[1], timeout=60)
            lid = LeaseId.new()
            assert other.store_bytes(data, lid) == cid
        finally:
            child.send_signal(signal.SIGCONT)
        child.stdin.write("read\n")
        child.stdin.flush()
        results = child.stdout.readline().split()
        assert results == ["LeaseExpired"] * 4, results
        assert child.wait(30) == 0
        assert other.get_data(cid, lid) == data
        other.advise_lease_dropped(lid, cid)
        other.collect()
        assert not other.verify()
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        other.close()


# == Item 7: a server at maxmemory with noeviction ===========================================

_HOLDER_PROGRAM = r"""
import os, sys
from blobleases import LeaseId
from blobleases.redis_storage import RedisStorage

url, namespace, host, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
storage = RedisStorage(url, namespace=namespace, host_id=host, heartbeat_ttl=3.0,
                       chunk_size=4096)
held = []
for i in range(count):
    lid = LeaseId.new()
    held.append((storage.store_bytes(os.urandom(10_000), lid), lid))
print("stored", flush=True)
readers = []
for line in sys.stdin:
    readers.append(storage.get_reader(*held[0]))
    print("reading", held[0][0], readers[-1].read(3).hex(), flush=True)
"""


def _holder(url: str, namespace: str, host: str, count: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_PROGRAM, url, namespace, host, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "stored", "the holder process failed"
    return child


def test_full_server_still_opens_drops_reaps_and_collects(
    own_server: RedisServer, tmp_path: Path
) -> None:
    """maxmemory below the memory in use, policy noeviction (the README's
    setting): the server refuses every write that may need memory. A new
    client still opens the store; stores fail with StoreFull naming
    maxmemory and leave nothing; reads, drops, reaping of dead holders (on
    this host and on another) and collect() work; live heartbeats are kept."""
    import redis

    namespace = _namespace()
    admin = redis.Redis.from_url(own_server.url)
    live = RedisStorage(own_server.url, namespace=namespace, heartbeat_ttl=3.0, chunk_size=4096)
    cache = RedisStorage(own_server.url, namespace=namespace, retain_bytes=1 << 20)
    local = _holder(own_server.url, namespace, live.host_id, 20)
    remote = _holder(own_server.url, namespace, "remote-host", 20)
    fresh: RedisStorage | None = None
    try:
        kept = os.urandom(20_000)
        kept_lid = LeaseId.new()
        kept_cid = live.store_bytes(kept, kept_lid)
        reader = live.get_reader(kept_cid, kept_lid)
        cached = os.urandom(3000)
        cached_lid = LeaseId.new()
        cached_cid = cache.store_bytes(cached, cached_lid)
        assert live.stats().blobs == 42
        admin.config_set("maxmemory-policy", "noeviction")
        # Below the memory in use (not equal to it: that leaves the server
        # full or not by the few bytes of a client buffer): full throughout.
        admin.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", b"x")

        fresh = RedisStorage(own_server.url, namespace=namespace, reap_interval=0)
        before = fresh.stats()
        assert before.blobs == 42
        extra = os.urandom(7000)
        extra_cid = ContentId.for_bytes(extra)
        for store in (
            lambda: fresh.store_bytes(extra, LeaseId.new()),
            lambda: fresh.store_file(io.BytesIO(extra), LeaseId.new()),
        ):
            with pytest.raises(StoreFull, match="maxmemory") as info:
                store()
            assert info.value.__cause__ is not None
        assert not fresh.contains(extra_cid)
        assert list(admin.scan_iter(match=f"{namespace}:{{{extra_cid}}}:*")) == []
        after = fresh.stats()
        assert (after.blobs, after.bytes, after.leases) == (
            before.blobs,
            before.bytes,
            before.leases,
        )
        # The CLI says so in one line; collect works there.
        url = f"{own_server.url}?namespace={namespace}"
        source = tmp_path / "extra.bin"
        source.write_bytes(extra)
        line = one_error_line(run_cli("--store", url, "put", str(source)))
        assert "the redis server is full" in line and "maxmemory" in line
        done = run_cli("--store", url, "collect")
        assert done.returncode == 0, done.stderr

        assert live.get_data(kept_cid, kept_lid) == kept
        reader.seek(5000)
        assert reader.read(10_000) == kept[5000:15_000]
        reader.close()
        with live.get_reader(kept_cid, kept_lid) as again:
            assert live.stat(kept_cid).reader_count == 1
            assert again.read() == kept
        assert live.stat(kept_cid).reader_count == 0
        live.collect()  # records the accesses of the reads
        hb_key = live._hb_key(live._owner(os.getpid()))
        left = int(admin.pttl(hb_key))
        assert left > 0
        assert wait_until(lambda: int(admin.pttl(hb_key)) > left, timeout=30), (
            "the heartbeat of a live process was not refreshed on a full server"
        )

        opened: list[ContentId] = []
        for child in (local, remote):  # each opens a reader on the full server
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("read\n")
            child.stdin.flush()
            words = child.stdout.readline().split()
            assert words[:1] == ["reading"], words
            opened.append(ContentId.parse(words[1]))
        assert fresh.stats().readers == 2
        assert [fresh.stat(c).reader_count for c in opened] == [1, 1]
        local.kill()
        local.wait()
        # Reaped by the next operation (its reader too: recorded for its pid).
        assert not fresh.contains(opened[0])
        remote.kill()
        remote.wait()
        fresh.collect()
        # The other host's holder is seen dead once its heartbeat lapses.
        assert wait_until(lambda: (fresh.collect(), fresh.stats().blobs == 2)[1], timeout=60)

        cache.advise_lease_dropped(cached_lid, cached_cid)
        stats = fresh.stats()
        assert (stats.blobs, stats.retained_blobs, stats.leases, stats.readers) == (2, 1, 1, 0)
        live.advise_lease_dropped(kept_lid, kept_cid)
        assert not live.contains(kept_cid)
        fresh.collect()
        assert fresh.stats().blobs == 1  # the retained one
        assert not fresh.verify()
        assert not fresh.verify(repair=True)
    finally:
        admin.config_set("maxmemory", 0)
        for child in (local, remote):
            if child.poll() is None:
                child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
        for storage in (live, cache, fresh):
            if storage is not None:
                storage.close()
        admin.close()
    # Room again: the store works as before.
    with RedisStorage(own_server.url, namespace=namespace) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"room again", lid)
        assert storage.get_data(cid, lid) == b"room again"
        storage.advise_lease_dropped(lid, cid)
        storage.collect()
        assert not storage.verify()


# == Item 8: unix socket urls ================================================================


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    """A private server that also listens on a unix socket in a temp dir."""
    sock = tmp_path / "s" / "redis.sock"
    sock.parent.mkdir()
    extra = ("--unixsocket", str(sock), "--unixsocketperm", "700")
    with started(
        lambda: RedisServer(tmp_path / "redis", extra=extra), lambda s: s.stop(kill=True)
    ) as server:
        yield server, str(sock)


def test_unix_socket_urls_work_and_round_trip(unix_server: tuple[RedisServer, str]) -> None:
    server, sock = unix_server
    url = f"unix://{sock}"
    storage = open_storage(url + "?namespace=unix-1")
    try:
        assert isinstance(storage, RedisStorage)
        assert storage.url == f"unix://{sock}?namespace=unix-1"
        lid = LeaseId.new()
        cid = storage.store_bytes(b"over a unix socket", lid)
        again = open_storage(storage.url)
        try:
            assert again.get_data(cid, lid) == b"over a unix socket"
        finally:
            again.close()
        # The same keys as seen over TCP.
        tcp = RedisStorage(server.url, namespace="unix-1")
        try:
            assert tcp.contains(cid)
        finally:
            tcp.close()
        storage.advise_lease_dropped(lid, cid)
        assert not storage.contains(cid)
        assert not storage.verify()
    finally:
        storage.close()
    default = RedisStorage(url)
    try:
        assert default.url == url
        assert repr(default) == f"<RedisStorage {url}>"
    finally:
        default.close()


def test_unix_socket_url_via_cli(unix_server: tuple[RedisServer, str]) -> None:
    _, sock = unix_server
    done = run_cli("--store", f"unix://{sock}", "stats")
    assert done.returncode == 0, done.stderr
    assert "blobs" in done.stdout


# == Item 9: errors that name what was wrong ==================================================


def _refused_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_cluster_gives_storage_error_naming_the_url() -> None:
    url = f"redis+cluster://127.0.0.1:{_refused_port()}"
    with pytest.raises(StorageError, match=re.escape(url)) as info:
        RedisStorage(url, socket_timeout=2)
    assert info.value.__cause__ is not None
    line = one_error_line(run_cli("--store", url, "stats"))
    assert url in line


@pytest.mark.parametrize(
    "name", ["heartbeat_ttl", "socket_timeout", "reap_interval", "transfer_ttl", "max_bytes"]
)
def test_numbers_too_large_name_their_argument(redis_server: RedisServer, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RedisStorage(redis_server.url, namespace=_namespace(), **{name: 10**400})
