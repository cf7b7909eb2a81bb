"""``blobleases why CID`` and ``BlobStorage.why``: every holder of a blob.

A real child process holds the blob by a plain lease, a ttl lease, a
detached lease and an open reader; ``blobleases put`` (a process that has
exited) holds it by its detached lease. The command runs as a real program
against a DirectoryStorage and a real redis-server; every field is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from blobleases import BlobManager, ContentId, DirectoryStorage, MemoryStorage, open_storage
from blobleases.cli_ops import duration, why_json
from blobleases.reports import ReaderInfo
from test_cli import assert_user_error, cli, ok, ok_json

HOLDER = r"""
import json, sys
from blobleases import BlobManager, open_storage
storage = open_storage(sys.argv[1])
manager = BlobManager(storage)
data = sys.argv[2].encode()
plain = manager.store(data)
ttl = manager.store(data, ttl=600)
detached = manager.store(data, detached=True)
reader = plain.get_reader()
print(json.dumps({
    "cid": str(plain.content_id),
    "plain": str(plain.lease_id),
    "ttl": str(ttl.lease_id),
    "detached": str(detached.lease_id),
}), flush=True)
sys.stdin.read()
"""


@pytest.fixture(params=["directory", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "directory":
        return str(tmp_path / "store")
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?namespace=why-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def holder(url: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], float]]:
    """A live process holding one blob four ways (started after ``put``
    made the store), with a marker on its command line."""
    payload = f"why-{uuid.uuid4().hex}"
    marker = f"--marker-{uuid.uuid4().hex[:8]}"
    ok(cli("put", "-", store=url, input=payload.encode()))
    before = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, payload, marker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ids = json.loads(proc.stdout.readline())
    ids["marker"] = marker
    try:
        yield proc, ids, before
    finally:
        proc.kill()
        proc.wait()


def test_why_lists_every_holder_with_every_field(
    url: str, holder: tuple[subprocess.Popen[str], dict[str, str], float]
) -> None:
    proc, ids, before = holder
    result = ok_json(cli("why", ids["cid"], "--json", store=url))
    after = time.time()
    assert result["content_id"] == ids["cid"]
    assert result["retained"] is False
    assert result["lease_count"] == 4 and result["reader_count"] == 1
    by_id = {e["lease_id"]: e for e in result["leases"]}
    mine = {ids["plain"], ids["ttl"], ids["detached"]}
    assert mine < set(by_id)
    [put_id] = set(by_id) - mine
    redis = url.startswith("redis")
    for lid in mine:
        e = by_id[lid]
        assert e["pid"] == proc.pid
        assert e["local"] is True and e["alive"] is True
        assert e["process"]["name"].startswith("python")
        assert ids["marker"] in e["process"]["cmdline"]
        assert e["readers"] == 1  # the child's open reader
        assert before <= e["created_at"] <= after
        assert 0 <= e["age"] <= after - before
        if redis:
            assert e["host"].startswith(socket.gethostname().replace(" ", "_")[:8])
        else:
            assert e["host"] == socket.gethostname()
    assert by_id[ids["plain"]]["detached"] is False
    assert by_id[ids["plain"]]["expires_at"] is None and by_id[ids["plain"]]["ttl_left"] is None
    ttl = by_id[ids["ttl"]]
    assert ttl["detached"] is False
    assert 0 < ttl["ttl_left"] <= 600
    assert before + 600 <= ttl["expires_at"] <= after + 600
    assert by_id[ids["detached"]]["detached"] is True
    # the put process has exited: its detached lease stays, its process is dead
    put = by_id[put_id]
    assert put["detached"] is True and put["alive"] is False and put["process"] is None
    assert put["readers"] == 0 and put["pid"] != proc.pid
    assert put["created_at"] <= before and put["age"] >= 0
    [reader] = result["readers"]
    assert reader["pid"] == proc.pid and reader["count"] == 1 and reader["alive"] is True
    assert ids["marker"] in reader["process"]["cmdline"]

    text = ok(cli("why", ids["cid"], store=url))
    assert "held by 4 leases and 1 open reader" in text
    for lid in [*mine, put_id]:
        assert lid in text
    assert f"pid {proc.pid}: " in text and ids["marker"] in text
    assert "(dead)" in text


def test_why_after_the_holder_goes_shows_retention(url: str, tmp_path: Path) -> None:
    payload = os.urandom(1000)
    with open_storage(url, create=True, retain_bytes=1 << 20) as storage:
        lease = BlobManager(storage).store(payload)
        cid = str(lease.content_id)
        assert ok_json(cli("why", cid, "--json", store=url))["retained"] is False
        lease.close()
        result = ok_json(cli("why", cid, "--json", store=url))
        assert result["retained"] is True
        assert result["leases"] == [] and result["readers"] == []
        assert "kept only by retention" in ok(cli("why", cid, store=url))


def test_why_errors(url: str, tmp_path: Path) -> None:
    ok(cli("put", "-", store=url, input=b"x"))
    absent = "sha256-" + "0" * 64
    assert_user_error(cli("why", absent, store=url), absent)
    assert_user_error(cli("why", "sha256-nothex", store=url), "sha256-nothex")
    missing = tmp_path / "nothing-here"
    assert_user_error(cli("why", absent, store=str(missing)), str(missing))
    assert not missing.exists()


def test_memory_why_counts_readers_per_process() -> None:
    storage = MemoryStorage(retain_bytes=1 << 20)
    manager = BlobManager(storage)
    plain = manager.store(b"memory why")
    ttl = manager.store(b"memory why", ttl=600)
    detached = manager.store(b"memory why", detached=True)
    readers = [plain.get_reader(), plain.get_reader()]
    report = storage.why(plain.content_id)
    assert {i.lease_id for i in report.leases} == {
        plain.lease_id,
        ttl.lease_id,
        detached.lease_id,
    }
    assert report.readers == (ReaderInfo(os.getpid(), 2, socket.gethostname()),)
    assert not report.retained and report.info.lease_count == 3
    flags = {i.lease_id: (i.detached, i.expires_at is not None) for i in report.leases}
    assert flags[detached.lease_id] == (True, False)
    assert flags[ttl.lease_id] == (False, True)
    for r in readers:
        r.close()
    for lease in (plain, ttl, detached):
        lease.close()
    assert storage.why(plain.content_id).retained is True


def test_memory_why_reports_every_holder_field() -> None:
    """SPEC section 9 on MemoryStorage as on the shared stores: each lease's
    age (when it was taken), host, process, ttl left and detached flag, and
    the readers' host and process."""
    before = time.time()
    storage = MemoryStorage()
    manager = BlobManager(storage)
    plain = manager.store(b"memory holders")
    ttl = manager.store(b"memory holders", ttl=600)
    detached = manager.store(b"memory holders", detached=True)
    reader = plain.get_reader()
    after = time.time()
    result = why_json(storage.why(plain.content_id), now=after)
    by_id = {e["lease_id"]: e for e in result["leases"]}
    assert set(by_id) == {str(x.lease_id) for x in (plain, ttl, detached)}
    for e in by_id.values():
        assert before <= e["created_at"] <= after
        assert e["age"] == after - e["created_at"]
        assert e["host"] == socket.gethostname() and e["local"] is True
        assert e["pid"] == os.getpid() and e["alive"] is True
        assert e["process"]["cmdline"] == psutil.Process().cmdline()
        assert e["readers"] == 1
    assert by_id[str(plain.lease_id)]["ttl_left"] is None
    timed = by_id[str(ttl.lease_id)]
    assert before + 600 <= timed["expires_at"] <= after + 600
    assert timed["ttl_left"] == timed["expires_at"] - after
    assert [by_id[str(x.lease_id)]["detached"] for x in (plain, ttl, detached)] == [
        False,
        False,
        True,
    ]
    [r] = result["readers"]
    assert (r["pid"], r["count"], r["host"], r["alive"]) == (
        os.getpid(),
        1,
        socket.gethostname(),
        True,
    )
    reader.close()
    for lease in (plain, ttl, detached):
        lease.close()


def _read_only_why(root: Path, cid: str) -> subprocess.CompletedProcess[bytes]:
    """``blobleases why --json`` with ``root`` on a read-only bind mount in a
    private mount namespace (root ignores permission bits)."""
    reason = ""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        reason = "needs root and unshare to make a read-only mount"
    else:
        script = (
            '{ mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1"; } || exit 77; '
            f'exec {sys.executable} -m blobleases --store "$1" why --json "$2"'
        )
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(root), cid],
            capture_output=True,
            timeout=120,
        )
        if result.returncode != 77 and not result.stderr.startswith(b"unshare:"):
            return result
        reason = f"cannot make a read-only mount here: {result.stderr.decode().strip()}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_directory_why_reads_a_store_without_the_created_column(tmp_path: Path) -> None:
    """A store written before leases recorded their time (no ``created``
    column): read-only, ages are unknown; opened writable, it gains the
    column and new leases have an age."""
    root = tmp_path / "old"
    with DirectoryStorage(root) as storage:
        lease = BlobManager(storage).store(b"old store", detached=True)
        cid = lease.content_id
    db = sqlite3.connect(root / "index.sqlite3")
    db.execute("ALTER TABLE leases DROP COLUMN created")
    db.close()
    [entry] = ok_json(_read_only_why(root, str(cid)))["leases"]
    assert entry["lease_id"] == str(lease.lease_id)
    assert entry["created_at"] is None and entry["age"] is None and entry["detached"]
    with DirectoryStorage(root) as storage:
        later = BlobManager(storage).get_by_content_id(cid)
        dated = [i.lease_id for i in storage.why(cid).leases if i.created_at is not None]
        assert dated == [later.lease_id]
        later.close()


def test_why_checks_its_argument() -> None:
    with pytest.raises(TypeError, match="content_id"):
        MemoryStorage().why("sha256-" + "0" * 64)  # type: ignore[arg-type]


def test_duration() -> None:
    assert duration(None) == "-"
    assert duration(0.2) == "0s"
    assert duration(200) == "3m 20s"
    assert duration(7500) == "2h 5m"
    assert duration(90061) == "1d 1h"


def test_the_default_why_is_built_from_stat_and_iter_leases() -> None:
    """What a backend without its own ``_why`` reports (readers: one entry
    of unknown pid; retained: present with no lease and no reader)."""
    from blobleases import BlobStorage

    storage = MemoryStorage(retain_bytes=1 << 20)
    manager = BlobManager(storage)
    lease = manager.store(b"default why")
    other = manager.store(b"default why", ttl=600)
    reader = lease.get_reader()
    report = BlobStorage._why(storage, lease.content_id)
    assert {i.lease_id for i in report.leases} == {lease.lease_id, other.lease_id}
    assert report.readers == (ReaderInfo(None, 1),)
    assert not report.retained and report.info.size == len(b"default why")
    reader.close()
    lease.close()
    other.close()
    assert BlobStorage._why(storage, lease.content_id).retained is True


KILLED = r"""
import json, sys
from blobleases import BlobManager, open_storage
manager = BlobManager(open_storage(sys.argv[1]))
plain = manager.store(b"taken before the 4th field")
detached = manager.store(b"taken before the 4th field", detached=True)
print(json.dumps([str(plain.content_id), str(plain.lease_id), str(detached.lease_id)]), flush=True)
sys.stdin.read()
"""


def test_redis_why_and_reaping_read_lease_values_without_the_taken_time(
    redis_server: Any,
) -> None:
    """Lease values stored before the time a lease was taken was recorded
    (three fields): ``why`` reports their age as unknown, and the scripts
    still reap such a lease of a dead process and keep a detached one."""
    url = f"{redis_server.url}?namespace=why-old-{uuid.uuid4().hex[:12]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    cid_text, plain, detached = json.loads(proc.stdout.readline())
    with open_storage(url) as storage:
        leases_key = storage._ckeys(cid_text)[1]  # type: ignore[attr-defined]
        for lid in (plain, detached):
            value = storage._r.hget(leases_key, lid).decode()  # type: ignore[attr-defined]
            assert value.count("|") == 3
            storage._r.hset(leases_key, lid, value.rpartition("|")[0])  # type: ignore[attr-defined]
        report = storage.why(ContentId.parse(cid_text))
        assert {str(i.lease_id): i.created_at for i in report.leases} == {
            plain: None,
            detached: None,
        }
        proc.kill()
        proc.wait()
        assert storage.collect().leases_reaped == 1
        [left] = storage.why(ContentId.parse(cid_text)).leases
        assert str(left.lease_id) == detached and left.detached and left.created_at is None
