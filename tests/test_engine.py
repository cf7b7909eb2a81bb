"""blobleases.engine over the smallest RoomAdapter: the decisions themselves,
apart from any backend (the conformance suite checks them on every backend)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blobleases import ContentId, IntegrityError, LeaseId, StoreFull
from blobleases.engine import Engine, ReapSchedule
from blobleases.policies import Policies


class _Room:
    """Content as a dict: key -> [size, referenced, has_reader]; an ordered
    list of retained keys; ``order`` is the LRU (oldest first)."""

    def __init__(self, **sizes: int) -> None:
        self.content = {key: [size, True, False] for key, size in sizes.items()}
        self.order = list(sizes)
        self.retained: list[str] = []
        self.deleted: list[str] = []
        self.evicted: list[tuple[int, int]] = []

    def unreferenced_size(self, key: str) -> int | None:
        size, referenced, reader = self.content[key]
        return None if referenced or reader or key in self.retained else size

    def delete_if_unreferenced(self, key: str) -> None:
        if self.unreferenced_size(key) is not None:
            self.delete_content(key)

    def delete_content(self, key: str) -> int:
        size = self.content.pop(key)[0]
        self.order.remove(key)
        if key in self.retained:
            self.retained.remove(key)
        self.deleted.append(key)
        return size

    def count_evictions(self, blobs: int, freed: int) -> None:
        self.evicted.append((blobs, freed))

    def retain(self, key: str) -> None:
        self.retained.append(key)

    def retained_bytes(self) -> int:
        return sum(self.content[key][0] for key in self.retained)

    def retained_oldest_first(self) -> Iterator[tuple[str, int]]:
        return ((key, self.content[key][0]) for key in self.retained)

    def evictable_oldest_first(self) -> Iterator[tuple[str, int, bool]]:
        return (
            (key, self.content[key][0], bool(self.content[key][2]))
            for key in self.order
            if key not in self.retained
        )

    def total_bytes(self) -> int:
        return sum(size for size, _, _ in self.content.values())


class _Owned(_Room):
    """_Room with leases (key, lid) -> (expires_at, detached, owner) and
    reader holds id -> (key, owner): the verbs of OwnerEnds over dicts, the
    owners named by strings. Content is referenced while it has a lease or
    a hold."""

    def __init__(self, **sizes: int) -> None:
        super().__init__(**sizes)
        self.leases: dict[tuple[str, LeaseId], tuple[float | None, bool, str]] = {}
        self.holds: dict[int, tuple[str, str]] = {}
        self.batches: list[int] = []  # the size of every batch handed out

    def lease(
        self, key: str, owner: str, expires_at: float | None = None, detached: bool = False
    ) -> LeaseId:
        lid = LeaseId.new()
        self.leases[key, lid] = (expires_at, detached, owner)
        return lid

    def unreferenced_size(self, key: str) -> int | None:
        if any(k == key for k, _ in self.leases) or any(k == key for k, _ in self.holds.values()):
            return None
        return None if key in self.retained else self.content[key][0]

    def _batch(self, items: list[tuple[str, LeaseId]], limit: int) -> list[tuple[str, LeaseId]]:
        self.batches.append(len(items[:limit]))
        return items[:limit]

    def expired_batch(self, now: float, limit: int) -> list[tuple[str, LeaseId]]:
        due = [lease for lease, (at, _, _) in self.leases.items() if at is not None and at <= now]
        return self._batch(due, limit)

    def owner_leases(self, owner: str, limit: int) -> list[tuple[str, LeaseId]]:
        mine = [lease for lease, (_, det, own) in self.leases.items() if own == owner and not det]
        return self._batch(mine, limit)

    def owner_holds(self, owner: str, limit: int) -> list[int]:
        return [hold for hold, (_, own) in self.holds.items() if own == owner][:limit]

    def remove_leases(self, batch: list[tuple[str, LeaseId]]) -> list[str]:
        for lease in batch:
            self.leases.pop(lease, None)
        return list(dict.fromkeys(key for key, _ in batch))

    def remove_holds(self, holds: list[int]) -> list[str]:
        return list(dict.fromkeys(self.holds.pop(hold)[0] for hold in holds if hold in self.holds))


def _engine(**policies: object) -> Engine[str]:
    return Engine(Policies(**policies), 0.0)  # type: ignore[arg-type]


def test_settle_retains_within_budget_and_trims_the_oldest() -> None:
    room = _Room(a=4, b=4, c=20)
    engine = _engine(retain_bytes=8)
    for key in "abc":
        room.content[key][1] = False
    engine.settle(room, "a")
    engine.settle(room, "b")
    assert room.retained == ["a", "b"] and not room.deleted
    engine.settle(room, "c")  # larger than the budget: deleted at once
    assert room.deleted == ["c"]
    assert engine.trim_retained(room, 4) == (1, 4)  # the oldest goes first
    assert room.retained == ["b"]


def test_settle_leaves_referenced_content_and_deletes_without_retention() -> None:
    room = _Room(a=1, b=1)
    engine = _engine()
    engine.settle(room, "a")  # referenced: stays
    room.content["b"][1] = False
    engine.settle(room, "b")
    assert room.deleted == ["b"] and "a" in room.content


def test_make_room_plans_before_deleting() -> None:
    room = _Room(old=4, reader=4, new=4)
    room.content["reader"][2] = True
    room.content["old"][1] = room.content["new"][1] = True
    refuse = _engine(max_bytes=12)
    with pytest.raises(StoreFull, match="on_full='refuse'"):
        refuse.make_room(room, 4)
    evict = _engine(max_bytes=12, on_full="evict")
    with pytest.raises(StoreFull):
        evict.make_room(room, 12)  # needs the reader's blob too: nothing goes
    assert room.deleted == [] and room.evicted == []
    with pytest.raises(StoreFull, match="cannot fit"):
        evict.make_room(room, 13)
    evict.make_room(room, 8)  # least recently used first, the reader passed over
    assert room.deleted == ["old", "new"]
    assert room.evicted == [(2, 8)]  # counted once, with the deletions


def test_check_read() -> None:
    engine, strict = _engine(), _engine(verify_reads=True)
    cid = ContentId.for_bytes(b"abc")
    engine.check_read(cid, b"abd", 3, 3)  # same size: found by verify(), not here
    with pytest.raises(IntegrityError, match="2 bytes, not its recorded 3"):
        engine.check_read(cid, b"ab", 3, 2)
    with pytest.raises(IntegrityError, match="do not hash"):
        strict.check_read(cid, b"abd", 3, 3)


def test_reap_schedule() -> None:
    schedule = ReapSchedule(5.0, 100.0)
    assert not schedule.due(104.9) and schedule.due(105.0)
    schedule.reaped(200.0)
    assert schedule.next == 205.0
    assert schedule.due_after(190.0, 196.0)  # the shared last reap is 6 s old
    assert not schedule.due_after(194.0, 196.0) and schedule.next == 199.0
    assert schedule.due_after(300.0, 196.0)  # the clock stepped back
    schedule.never()
    assert not schedule.due(1e18)


def test_expire_ends_only_leases_past_their_ttl_in_batches_and_settles_their_content() -> None:
    room = _Owned(a=4, b=4, c=4, d=4, e=100)
    for key in "abcde":
        room.lease(key, "p1", expires_at=10.0)
    room.lease("b", "p2")  # still referenced when its ttl lease goes
    room.lease("d", "p2", expires_at=20.0)  # not expired yet
    engine = _engine(retain_bytes=8)
    assert engine.expire_batch(room, 10.0, 2) == 2  # at most ``limit``
    assert engine.expire_all(room, 10.0, 2) == 3
    assert room.batches == [2, 2, 1]  # until a batch comes back short
    assert room.deleted == ["e"]  # over the retain budget: deleted
    assert room.retained == ["a", "c"]  # unreferenced: retained
    assert "b" in room.content and "d" in room.content  # still leased
    assert engine.expire_all(room, 10.0) == 0 and room.batches[-1] == 0
    assert engine.expire_all(room, 20.0) == 1 and "d" in room.retained


def test_expire_all_calls_between_only_between_full_batches() -> None:
    room = _Owned(**{f"k{i}": 1 for i in range(5)})
    for i in range(5):
        room.lease(f"k{i}", "p", expires_at=1.0)
    slices: list[int] = []
    engine = _engine()
    assert engine.expire_all(room, 1.0, 2, lambda: slices.append(len(room.leases))) == 5
    assert slices == [3, 1]  # each after a whole batch was ended and settled
    assert sorted(room.deleted) == [f"k{i}" for i in range(5)]


def test_end_owner_ends_its_leases_and_holds_not_detached_ones_nor_others() -> None:
    room = _Owned(a=1, b=1, c=1, d=1)
    for key in "abc":
        room.lease(key, "dead")
    room.lease("b", "alive")
    room.lease("d", "dead", detached=True)  # outlives its owner (SPEC 2.6)
    room.holds[7] = ("c", "dead")
    room.holds[8] = ("a", "alive")
    slices: list[int] = []
    engine = _engine()
    assert engine.end_owner(room, "dead", 2, lambda: slices.append(0)) == (3, 1)
    assert room.deleted == ["c"]  # "a": the live reader; "b": the live lease
    assert len(slices) == 1  # between the full batch of leases and the last
    assert {own for _, _, own in room.leases.values()} == {"alive", "dead"}
    assert [lease for lease, (_, det, _) in room.leases.items() if det] == [
        lease for lease in room.leases if lease[0] == "d"
    ]
    assert engine.end_owner(room, "dead") == (0, 0)
