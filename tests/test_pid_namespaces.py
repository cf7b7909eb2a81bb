"""Liveness across pid namespaces (containers sharing a volume): real
``unshare -p -f`` namespaces, with and without ``--mount-proc``, sharing one
DirectoryStorage (and one RedisStorage) with processes of the host's pid
namespace. The same pid numbers mean different processes there, and /proc
may show another namespace than the process's own: no live lease is reaped
across namespaces, and every killed holder's leases are reaped from the
other side.

Holders are child processes that take leases and readers, keep working in
a background thread, and answer commands on stdin with one JSON line."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from blobleases import ContentId, LeaseExpired, LeaseId
from blobleases.directory import DirectoryStorage
from blobleases.redis_storage import RedisStorage
from blobleases.testing import blob, wait_until
from redis_servers import RedisServer

REAP = 0.5  # reap_interval of every handle in these tests
SRC = os.environ.get("NS_TEST_SRC", str(Path(__file__).resolve().parents[1] / "src"))

_HOLDER = r"""
import json, os, sys, threading, time, traceback
from blobleases import ContentId, LeaseId, open_storage
from blobleases.testing import blob

url, name, shared_text, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
storage = open_storage(url, **json.loads(options))
seed = sum(name.encode()) * 1000
held = []
for i in range(6):
    data = blob(3000 + i, seed + i)
    lid = LeaseId.new()
    cid = storage.store_bytes(data, lid)
    held.append((cid, lid, data))
shared = ContentId.parse(shared_text)
shared_lid = LeaseId.new()
storage.lease_by_content(shared, shared_lid)
shared_data = storage.get_data(shared, shared_lid)
held.append((shared, shared_lid, shared_data))
readers = [(storage.get_reader(cid, lid), data) for cid, lid, data in held[:2]]
temp = storage._write_temp(memoryview(b"half written")) if hasattr(storage, "_write_temp") else ""
errors = []
running = threading.Event()
running.set()
stop = threading.Event()

def work():
    n = 0
    while not stop.is_set():
        if not running.wait(0.05):
            continue
        try:
            n += 1
            lid = LeaseId.new()
            data = blob(500, seed + 100 + n % 7) + name.encode()
            cid = storage.store_bytes(data, lid)
            assert storage.get_data(cid, lid) == data
            storage.advise_lease_dropped(lid, cid)
            cid, lid, data = held[n % len(held)]
            assert storage.get_data(cid, lid) == data
        except Exception:
            errors.append(traceback.format_exc())
            return
        time.sleep(0.01)

thread = threading.Thread(target=work, daemon=True)
thread.start()

def reply(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

reply(ready=True, pidns=os.readlink("/proc/self/ns/pid"), pid=os.getpid(),
      leases=[[str(c), str(l)] for c, l, _ in held], temp=temp)
for line in sys.stdin:
    command = line.strip()
    try:
        if command == "check":
            for cid, lid, data in held:
                assert storage.get_data(cid, lid) == data, f"wrong bytes for {lid}"
            for reader, data in readers:
                reader.seek(0)
                assert reader.read() == data, "a reader returned wrong bytes"
            if temp:
                assert os.path.exists(os.path.join(str(storage.root), "tmp", temp)), (
                    "this live writer's temporary file was removed"
                )
            reply(ok=not errors, error="".join(errors))
        elif command == "pause":
            running.clear()
            time.sleep(0.1)  # let a running step finish
            reply(ok=True)
        elif command == "resume":
            running.set()
            reply(ok=True)
        elif command == "collect":
            report = storage.collect()
            reply(ok=True, leases_reaped=report.leases_reaped)
        elif command == "exit":
            stop.set()
            thread.join()
            reply(ok=not errors, error="".join(errors))
            break
        else:
            reply(ok=False, error=f"unknown command {command!r}")
    except Exception:
        reply(ok=False, error=traceback.format_exc())
"""


def _unshare_refusal() -> str | None:
    """Why ``unshare -p -f --mount-proc`` cannot run here, or None."""
    try:
        done = subprocess.run(
            ["unshare", "-p", "-f", "--mount-proc", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare is not available: {exc}"
    if done.returncode != 0:
        return f"unshare -p -f --mount-proc is refused: {done.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def namespaces() -> None:
    reason = _unshare_refusal()
    if reason is not None:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)


class Holder:
    """A holder process, in a new pid namespace (``namespace``: ``"proc"``
    with its own /proc, ``"bare"`` seeing the host's /proc) or the host's."""

    def __init__(
        self,
        url: str,
        name: str,
        shared: ContentId,
        namespace: str | None,
        **options: Any,
    ) -> None:
        prefix: list[str] = []
        if namespace == "proc":
            prefix = ["unshare", "-p", "-f", "--mount-proc"]
        elif namespace == "bare":
            prefix = ["unshare", "-p", "-f"]
        env = dict(os.environ, PYTHONPATH=SRC)
        self.name = name
        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-c",
                _HOLDER,
                url,
                name,
                str(shared),
                json.dumps({"reap_interval": REAP, **options}),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.namespaced = namespace is not None
        hello = self._read()
        assert hello.get("ready"), hello
        self.pidns: str = hello["pidns"]
        self.leases = [(ContentId.parse(c), LeaseId.parse(lid)) for c, lid in hello["leases"]]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        assert ready, f"holder {self.name} did not answer"
        line = self.proc.stdout.readline()
        assert line, f"holder {self.name} exited (status {self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        assert answer["ok"], f"holder {self.name}: {command}: {answer.get('error')}"
        return answer

    def kill(self) -> None:
        """SIGKILL the holding Python process itself (in a namespace: the
        child of ``unshare``, the namespace's pid 1) and wait until it is gone."""
        if self.namespaced:
            children = psutil.Process(self.proc.pid).children()
            assert len(children) == 1, children
            os.kill(children[0].pid, signal.SIGKILL)
        else:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=120)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            for child in _children(self.proc.pid):
                child.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _index_leases(root: Path) -> set[str]:
    """Lease ids in the index, read without a DirectoryStorage (so without
    the reap an operation of this process would do)."""
    db = sqlite3.connect(root / "index.sqlite3")
    try:
        return {r[0] for r in db.execute("SELECT lid FROM leases")}
    finally:
        db.close()


def _work(storage: DirectoryStorage, rounds: int, salt: int) -> None:
    """Ordinary work of the host: store, lease, read, drop and collect."""
    for i in range(rounds):
        lid = LeaseId.new()
        data = blob(700, salt + i)
        cid = storage.store_bytes(data, lid)
        other = LeaseId.new()
        storage.lease_by_content(cid, other)
        assert storage.get_data(cid, other) == data
        storage.advise_lease_dropped(lid, cid)
        storage.advise_lease_dropped(other, cid)
        storage.collect()


def _busy_for(storage: DirectoryStorage, seconds: float, salt: int) -> None:
    """Keep the host working for at least ``seconds`` (reaps fall due meanwhile)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        _work(storage, 3, salt + 10 * n)
        n += 1
        time.sleep(0.02)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.close()


def _gone(storage: DirectoryStorage, holder: Holder) -> bool:
    lids = {str(i.lease_id) for i in storage.iter_leases()}
    return not lids & {str(lid) for _, lid in holder.leases}


def test_holders_in_two_namespaces_and_the_host_share_a_store(
    namespaces: None, tmp_path: Path, holders: list[Holder]
) -> None:
    root = tmp_path / "s"
    with DirectoryStorage(root, reap_interval=REAP) as storage:
        shared_data = blob(5000, 1)
        host_lid = LeaseId.new()
        shared = storage.store_bytes(shared_data, host_lid)
        url = storage.url
        a = Holder(url, "a", shared, "proc")
        holders.append(a)
        b = Holder(url, "b", shared, "proc")
        holders.append(b)
        h = Holder(url, "h", shared, None)
        holders.append(h)
        assert len({a.pidns, b.pidns, h.pidns}) == 3
        _busy_for(storage, 4 * REAP, 1000)
        for holder in (a, b, h):
            holder.ask("check")
        assert storage.get_data(shared, host_lid) == shared_data

        # A namespaced holder is SIGKILLed: the host reaps it (the others are
        # paused, so only the host can) within reap_interval plus one operation.
        b.ask("pause")
        h.ask("pause")
        a.kill()
        time.sleep(REAP)
        assert _gone(storage, a)  # iter_leases is the one operation
        for cid, lid in a.leases[:6]:
            assert not storage.contains(cid)
            with pytest.raises(LeaseExpired):
                storage.get_data(cid, lid)
        b.ask("resume")
        h.ask("resume")
        _busy_for(storage, 2 * REAP, 2000)
        b.ask("check")
        h.ask("check")

        # A host holder is SIGKILLed: a namespaced process's collect() reaps it.
        h.kill()
        b.ask("collect")
        assert not _index_leases(root) & {str(lid) for _, lid in h.leases}
        b.ask("check")
        b.ask("exit")
        assert storage.get_data(shared, host_lid) == shared_data
        storage.advise_lease_dropped(host_lid, shared)
        storage.collect()
        assert not storage.verify()


def test_a_namespaced_holder_without_its_own_proc_is_reaped_when_killed(
    namespaces: None, tmp_path: Path, holders: list[Holder]
) -> None:
    """``unshare -p -f`` without ``--mount-proc``: the holder's /proc shows
    the host's pid namespace (its pid 1 is the host's init)."""
    root = tmp_path / "s"
    with DirectoryStorage(root, reap_interval=REAP) as storage:
        shared_data = blob(5000, 2)
        host_lid = LeaseId.new()
        shared = storage.store_bytes(shared_data, host_lid)
        c = Holder(storage.url, "c", shared, "bare")
        holders.append(c)
        _busy_for(storage, 3 * REAP, 3000)
        c.ask("check")
        c.ask("pause")
        c.kill()
        time.sleep(REAP)
        assert _gone(storage, c)
        for cid, _ in c.leases[:6]:
            assert not storage.contains(cid)
        assert storage.get_data(shared, host_lid) == shared_data
        storage.collect()
        assert not list((root / "tmp").iterdir())  # its temporary file went too
        assert not storage.verify()


# == RedisStorage: owners name their pid namespace ====================================

HEARTBEAT = 3.0  # heartbeat_ttl of the Redis holders


def test_redis_holders_in_two_namespaces_share_a_store(
    namespaces: None, redis_server: RedisServer, holders: list[Holder]
) -> None:
    """Every process has the same host id (one machine); the namespaced
    holders are each pid 1 of their namespace. No live lease is reaped; a
    killed holder's leases go once its heartbeat lapses, seen from the host
    and from inside another namespace."""
    namespace = f"ns-{os.urandom(6).hex()}"
    url = f"{redis_server.url}?namespace={namespace}"
    options: dict[str, Any] = {"heartbeat_ttl": HEARTBEAT}
    with RedisStorage(url, reap_interval=REAP, heartbeat_ttl=HEARTBEAT) as storage:
        shared_data = blob(5000, 3)
        host_lid = LeaseId.new()
        shared = storage.store_bytes(shared_data, host_lid)
        a = Holder(url, "a", shared, "proc", **options)
        holders.append(a)
        b = Holder(url, "b", shared, "proc", **options)
        holders.append(b)
        c = Holder(url, "c", shared, "bare", **options)
        holders.append(c)
        h = Holder(url, "h", shared, None, **options)
        holders.append(h)
        end = time.monotonic() + max(3 * REAP, 2 * HEARTBEAT)
        n = 0
        while time.monotonic() < end:
            n += 1
            lid = LeaseId.new()
            cid = storage.store_bytes(blob(700, 4000 + n), lid)
            storage.advise_lease_dropped(lid, cid)
            storage.collect()
            time.sleep(0.05)
        for holder in (a, b, c, h):
            holder.ask("check")
        assert storage.get_data(shared, host_lid) == shared_data

        a.kill()
        a_lids = {lid for _, lid in a.leases}
        assert wait_until(
            lambda: not a_lids & {i.lease_id for i in storage.iter_leases()}, timeout=120
        )
        for cid, _ in a.leases[:6]:
            assert not storage.contains(cid)
        for holder in (b, c, h):
            holder.ask("check")

        h.kill()
        h_lids = {lid for _, lid in h.leases}

        def reaped() -> bool:
            b.ask("collect")  # a namespaced process collects too
            return not h_lids & {i.lease_id for i in storage.iter_leases()}

        assert wait_until(reaped, timeout=120, interval=0.2)
        for holder in (b, c):
            holder.ask("check")
            holder.ask("exit")
        assert storage.get_data(shared, host_lid) == shared_data
        storage.advise_lease_dropped(host_lid, shared)
        storage.collect()
        assert not storage.verify()


# == Pids named by the caller mean pids of its own namespace ==========================

_ADVISE = r"""
import sys
from blobleases import open_storage
storage = open_storage(sys.argv[1])
for pid in map(int, sys.argv[2:]):
    storage.advise_pid_terminated(pid)
    storage.advise_of_pid(pid)
storage.collect()
storage.close()
"""


def test_pids_named_in_another_namespace_are_other_processes(
    namespaces: None, tmp_path: Path
) -> None:
    """A lease this process took for a live child (``LeaseId.new(pid=...)``,
    judged by pid and start time) and this process's own lease survive a
    namespaced process's ``advise_pid_terminated`` and ``advise_of_pid`` of
    the same pid numbers and its ``collect()``; the child's lease is reaped
    here once the child dies."""
    root = tmp_path / "s"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with DirectoryStorage(root, reap_interval=REAP) as storage:
            data = blob(4000, 5)
            mine = LeaseId.new()
            cid = storage.store_bytes(data, mine)
            theirs = LeaseId.new(pid=child.pid)
            storage.lease_by_content(cid, theirs)
            pids = [str(child.pid), str(os.getpid()), "1"]
            for mode in (["--mount-proc"], []):
                subprocess.run(
                    [
                        "unshare",
                        "-p",
                        "-f",
                        *mode,
                        sys.executable,
                        "-c",
                        _ADVISE,
                        storage.url,
                        *pids,
                    ],
                    check=True,
                    env=dict(os.environ, PYTHONPATH=SRC),
                    timeout=120,
                )
                assert storage.get_data(cid, theirs) == data
                assert storage.get_data(cid, mine) == data
            child.kill()
            child.wait()
            report = storage.collect()
            assert report.leases_reaped == 1
            with pytest.raises(LeaseExpired):
                storage.get_data(cid, theirs)
            assert storage.get_data(cid, mine) == data
            assert not storage.verify()
    finally:
        child.kill()
        child.wait()


# == The lock files themselves ========================================================

_PROBE = r"""
import sys
from blobleases.liveness import owner_alive
import os
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
print(" ".join(f"{t}={int(owner_alive(fd, t))}" for t in sys.argv[2:]))
"""


def _probe(owners: Path, *tokens: str) -> dict[str, bool]:
    """Probe lock files from another process (never from this one: closing
    the probe's descriptor would drop this process's own lock)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(owners), *tokens],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=SRC),
    ).stdout.split()
    return {k: v == "1" for k, v in (item.split("=") for item in out)}


def test_each_process_holds_a_lock_file_while_it_lives(tmp_path: Path) -> None:
    """A holder's ``owners/<token>`` (0600) is locked while it lives, is one
    per process (a forked child gets its own), and goes with its rows when
    it is reaped; this process's own file goes when its last handle closes
    with nothing held."""
    root = tmp_path / "s"
    owners = root / "owners"
    with DirectoryStorage(root, reap_interval=3600) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(blob(3000, 6), lid)
        (mine,) = [p.name for p in owners.iterdir()]
        assert (owners / mine).stat().st_mode & 0o777 == 0o600
        assert _probe(owners, mine) == {mine: True}
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child is killed
            try:
                storage.lease_by_content(cid, LeaseId.new())
            finally:
                signal.pause()
                os._exit(0)
        try:
            tokens: set[str] = set()
            deadline = time.monotonic() + 120
            while len(tokens) < 2 and time.monotonic() < deadline:
                tokens = {p.name for p in owners.iterdir()}
                time.sleep(0.01)
            (theirs,) = tokens - {mine}
            while len(list(storage.iter_leases())) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _probe(owners, mine, theirs) == {mine: True, theirs: True}
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert _probe(owners, theirs) == {theirs: False}
        report = storage.collect()
        assert report.leases_reaped == 1 and report.processes_reaped == 1
        assert [p.name for p in owners.iterdir()] == [mine]
        storage.advise_lease_dropped(lid, cid)
    assert not list(owners.iterdir())


_OLD_FORMAT_CLIENT = r"""
import sys, time
from blobleases import LeaseId
from blobleases.redis_storage import RedisStorage

# a client of the format before pid namespaces were named: owners "<host id>/<pid>"
RedisStorage._local = property(lambda self: self.host_id)
storage = RedisStorage(sys.argv[1], heartbeat_ttl=float(sys.argv[2]), reap_interval=0.5)
lid = LeaseId.new()
cid = storage.store_bytes(b"stored by an older client", lid)
print(cid, lid, storage._owner(lid.pid), flush=True)
time.sleep(600)
"""


def test_redis_owners_of_the_older_format_are_judged_by_their_heartbeat(
    redis_server: RedisServer,
) -> None:
    """An owner ``<host id>/<pid>`` (no pid namespace: written by an older
    blobleases) keeps its leases while its heartbeat lives, and they are
    reaped once it lapses."""
    url = f"{redis_server.url}?namespace=old-{os.urandom(6).hex()}"
    client = subprocess.Popen(
        [sys.executable, "-c", _OLD_FORMAT_CLIENT, url, str(HEARTBEAT)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=SRC),
    )
    try:
        assert client.stdout is not None
        cid_text, lid_text, owner = client.stdout.readline().split()
        with RedisStorage(url, reap_interval=REAP, heartbeat_ttl=HEARTBEAT) as storage:
            assert owner == f"{storage.host_id}/{client.pid}"
            assert storage._owner(client.pid) != owner
            cid, lid = ContentId.parse(cid_text), LeaseId.parse(lid_text)
            for _ in range(3):
                storage.collect()
                assert storage.get_data(cid, lid) == b"stored by an older client"
            client.kill()
            client.wait()
            assert wait_until(lambda: not storage.contains(cid), timeout=120, interval=0.2)
            assert not storage.verify()
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()


def test_lock_files_removed_behind_our_back_are_put_back(
    tmp_path: Path, holders: list[Holder]
) -> None:
    """``owners/`` removed with every lock file in it: each live process puts
    its file back at its next reap, and a handle whose directory descriptor
    went stale reopens it before judging anyone, so no live lease is reaped."""
    root = tmp_path / "s"
    owners = root / "owners"
    with DirectoryStorage(root, reap_interval=REAP) as storage:
        data = blob(4000, 7)
        mine = LeaseId.new()
        shared = storage.store_bytes(data, mine)
        h = Holder(storage.url, "h", shared, None)
        holders.append(h)
        h.ask("check")
        shutil.rmtree(owners)
        deadline = time.monotonic() + 120
        while not (owners.is_dir() and list(owners.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.02)  # the holder keeps working: its next reap puts its file back
        assert len(list(owners.iterdir())) == 1
        report = storage.collect()
        assert report.leases_reaped == 0
        assert len(list(owners.iterdir())) == 2  # this process's file is back too
        h.ask("check")
        assert storage.get_data(shared, mine) == data
        h.kill()
        assert storage.collect().processes_reaped == 1
        assert storage.get_data(shared, mine) == data
        assert not storage.verify()
