"""MemoryStorage keeps each blob's leases in the blob's own record: the
bookkeeping around that (counts, other processes' leases, deletion) and the
shared last-access time."""

from __future__ import annotations

import time

import pytest

from blobleases import ContentNotFound, LeaseExpired, LeaseId, MemoryStorage


def test_counts_follow_leases_of_many_blobs() -> None:
    storage = MemoryStorage()
    a, b = LeaseId.new(), LeaseId.new()
    x = storage.store_bytes(b"x", a)
    y = storage.store_bytes(b"y", b)
    storage.lease_by_content(x, b)
    storage.lease_by_content(x, LeaseId.parse(str(b)))  # an equal id: already held
    assert storage.stat(x).lease_count == 2
    assert storage.stats().leases == 3
    assert sorted((str(h.lease_id), h.content_id) for h in storage.iter_leases()) == sorted(
        [(str(a), x), (str(b), x), (str(b), y)]
    )
    storage.advise_lease_dropped(LeaseId.parse(str(b)), x)
    assert storage.stat(x).lease_count == 1
    assert storage.stat(y).lease_count == 1
    storage.advise_lease_dropped(a, x)
    assert not storage.contains(x)
    storage.advise_lease_dropped(a, x)  # not held: a no-op
    assert storage.stats().leases == 1


def test_evicted_content_forgets_other_processes_leases() -> None:
    storage = MemoryStorage(max_bytes=4, on_full="evict")
    other = LeaseId.new(pid=2_000_000_000)  # no such process
    mine = LeaseId.new()
    old = storage.store_bytes(b"abcd", mine)
    storage.lease_by_content(old, other)
    new = storage.store_bytes(b"efgh", LeaseId.new())  # evicts old, with both its leases
    with pytest.raises(LeaseExpired):
        storage.get_data(old, other)
    with pytest.raises(ContentNotFound):
        storage.lease_by_content(old, mine)
    storage.advise_pid_terminated(other.pid)  # nothing left to end
    assert storage.stats().leases == 1
    assert storage.contains(new)
    assert not storage.verify()


def test_terminating_a_process_ends_only_its_non_detached_leases() -> None:
    storage = MemoryStorage()
    pid = 2_000_000_001
    keep = LeaseId.new()
    cid = storage.store_bytes(b"shared", keep)
    gone, detached = LeaseId.new(pid=pid), LeaseId.new(pid=pid)
    storage.lease_by_content(cid, gone)
    storage.lease_by_content(cid, detached, detached=True)
    storage.advise_pid_terminated(pid)
    assert {str(h.lease_id) for h in storage.iter_leases()} == {str(keep), str(detached)}
    with pytest.raises(LeaseExpired):
        storage.get_data(cid, gone)
    assert storage.get_data(cid, detached) == b"shared"


def test_last_access_advances_and_never_precedes_creation() -> None:
    storage = MemoryStorage()
    lid = LeaseId.new()
    cid = storage.store_bytes(b"timed", lid)
    first = storage.stat(cid)
    assert first.created <= first.last_access <= time.time()
    time.sleep(0.01)
    before = time.time()
    storage.lease_by_content(cid, LeaseId.new())
    later = storage.stat(cid)
    assert before - 0.002 <= later.last_access <= time.time()
    assert later.last_access > first.last_access
    assert later.created == first.created
