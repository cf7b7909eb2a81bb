"""Two processes standing for two hosts share blobs in one PostgresStorage
with the S3 tier; one is SIGKILLed: its leases are reaped after its
heartbeat lapses and its unshared objects deleted from S3, while the
other's stay readable.

Each host has its own host id and its own network namespace (tests/pg_netns.py):
it reaches PostgreSQL and S3 over a veth pair, through relays to the servers
on this namespace's loopback, and its own loopback leads nowhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from blobleases import ContentId, LeaseId
from blobleases.postgres_storage import PostgresStorage
from blobleases.testing import wait_until
from pg_fixtures import BUCKET, s3_environment, unavailable
from pg_netns import HostNetwork, NetnsUnavailable
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres

_HOST = textwrap.dedent(
    """
    import sys
    from blobleases import ContentId, LeaseId
    from blobleases.postgres_storage import PostgresStorage

    dsn, blobs, namespace, host, ttl = sys.argv[1:6]
    store = PostgresStorage(dsn, blobs=blobs, namespace=namespace, host_id=host,
                            heartbeat_ttl=float(ttl))
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "store":
            cid = store.store_bytes(arg.encode() * 1000, LeaseId.new())
            print(cid, flush=True)
        elif cmd == "lease":
            lid = LeaseId.new()
            store.lease_by_content(ContentId.parse(arg), lid)
            print(lid, flush=True)
        elif cmd == "collect":
            print(store.collect().leases_reaped, flush=True)
        elif cmd == "netns":
            print(os.readlink("/proc/self/ns/net"), flush=True)
        elif cmd == "loopback":
            try:
                socket.create_connection(("127.0.0.1", int(arg)), timeout=5).close()
                print("reached", flush=True)
            except OSError as exc:
                print(type(exc).__name__, flush=True)
    """
)
_HOST = "import os, socket" + _HOST


class _Host:
    def __init__(
        self,
        dsn: str,
        blobs: str,
        namespace: str,
        host: str,
        ttl: float,
        network: HostNetwork | None = None,
    ) -> None:
        argv = [sys.executable, "-c", _HOST, dsn, blobs, namespace, host, repr(ttl)]
        self.process = subprocess.Popen(
            argv if network is None else network.command(*argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"host process gave no answer to {line!r}"
        return answer

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def hosts(postgres_server: PostgresServer, s3_server: S3Server) -> Iterator[tuple[str, str, str]]:
    namespace = f"h-{uuid.uuid4().hex[:12]}"
    blobs = f"s3://{BUCKET}/{namespace}?endpoint={s3_server.endpoint}"
    with s3_environment():
        yield postgres_server.dsn, blobs, namespace


@pytest.fixture
def networks() -> Iterator[list[HostNetwork]]:
    """Two network namespaces, each joined to this one by a veth pair."""
    made: list[HostNetwork] = []
    try:
        try:
            made += [HostNetwork(), HostNetwork()]
        except NetnsUnavailable as exc:
            unavailable("network namespaces (ip netns, veth; as root)", str(exc))
        yield made
    finally:
        for network in made:
            network.close()


def _remote(
    network: HostNetwork, postgres_server: PostgresServer, s3_server: S3Server, namespace: str
) -> tuple[str, str]:
    """The dsn and blobs url by which a host in ``network`` reaches the servers."""
    pg = network.relay(postgres_server.port)
    s3 = network.relay(s3_server.ports["s3"])
    return (
        f"postgresql://postgres@{network.outer}:{pg}/postgres",
        f"s3://{BUCKET}/{namespace}?endpoint=http://{network.outer}:{s3}",
    )


def test_killed_host_is_reaped_after_its_heartbeat(
    hosts: tuple[str, str, str],
    networks: list[HostNetwork],
    postgres_server: PostgresServer,
    s3_server: S3Server,
) -> None:
    dsn, blobs, namespace = hosts
    a_net, b_net = networks
    a = _Host(
        *_remote(a_net, postgres_server, s3_server, namespace), namespace, "host-a", 1.0, a_net
    )
    b = _Host(
        *_remote(b_net, postgres_server, s3_server, namespace), namespace, "host-b", 1.0, b_net
    )
    # the observer judges with a long heartbeat_ttl: a live host is never
    # taken for dead however loaded the machine
    observer = PostgresStorage(
        dsn, blobs=blobs, namespace=namespace, host_id="host-c", heartbeat_ttl=600
    )
    try:
        # each host in its own network namespace, its loopback leading nowhere
        spaces = {a.ask("netns -"), b.ask("netns -"), os.readlink("/proc/self/ns/net")}
        assert len(spaces) == 3, spaces
        assert a.ask(f"loopback {postgres_server.port}") == "ConnectionRefusedError"
        assert b.ask(f"loopback {s3_server.ports['s3']}") == "ConnectionRefusedError"
        shared = ContentId.parse(a.ask("store shared"))
        alone = ContentId.parse(a.ask("store alone"))
        b_lease = LeaseId.parse(b.ask(f"lease {shared}"))
        tier = observer.tier
        assert tier.size_of(tier.key(alone)) is not None

        observer.collect()  # both hosts alive: nothing of theirs is reaped
        assert observer.contains(shared) and observer.contains(alone)
        assert observer.stat(shared).lease_count == 2

        a.kill()

        def reaped_by_b() -> bool:
            # b judges with heartbeat_ttl=1: a's leases go once its beat lapses
            b.ask("collect -")
            return not observer.contains(alone)

        assert wait_until(reaped_by_b, timeout=60, interval=0.2)
        assert not observer.contains(alone)
        assert tier.size_of(tier.key(alone)) is None  # its object left S3
        assert observer.contains(shared)
        assert observer.stat(shared).lease_count == 1  # b's lease only
        assert observer.get_data(shared, b_lease) == b"shared" * 1000
        assert tier.size_of(tier.key(shared)) == 6000
        assert not observer.verify()
    finally:
        for host in (a, b):
            if host.process.poll() is None:
                host.kill()
        observer.close()


# The heartbeat and watchdog threads are running: forking is what is tested.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_uses_its_own_connections(hosts: tuple[str, str, str]) -> None:
    dsn, blobs, namespace = hosts
    storage = PostgresStorage(dsn, blobs=blobs, namespace=namespace)
    try:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"across fork", lid)
        backends_before = _backend_pids(storage)
        pid = os.fork()
        if pid == 0:  # the child: works, then exits the normal way (finalizers run)
            code = 1
            try:
                child_lid = LeaseId.new()
                storage.lease_by_content(cid, child_lid)
                ok = storage.get_data(cid, child_lid) == b"across fork"
                code = 0 if ok and not (_backend_pids(storage) & backends_before) else 2
                storage.advise_lease_dropped(child_lid, cid)
                storage.close()
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's pooled connections were neither used nor closed by the child
        assert storage.get_data(cid, lid) == b"across fork"
        assert _backend_pids(storage) <= backends_before | _backend_pids(storage)
        assert storage.stat(cid).lease_count == 1
    finally:
        storage.close()


def _backend_pids(storage: PostgresStorage) -> set[int]:
    """The server pids of the connections this process's pool holds."""
    return {int(r[0]) for r in storage._exec("SELECT pg_backend_pid()")}
