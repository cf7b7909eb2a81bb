"""blobleases.engine over the smallest RoomAdapter: the decisions themselves,
apart from any backend (the conformance suite checks them on every backend)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blobleases import ContentId, IntegrityError, StoreFull
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
