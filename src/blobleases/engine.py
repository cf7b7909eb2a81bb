"""The semantics of SPEC sections 2 and 3, once: what every backend decides.

A backend is an *adapter*: it owns its data (dicts in memory, rows in SQLite)
and implements the verbs of :class:`Adapter`, each a small mechanical step
with the guarantee its docstring states. :class:`Engine` holds the rules and
calls the verbs:

- the lease and reader-hold lifecycle: :meth:`Engine.hold`,
  :meth:`Engine.store_hit` (dedup counting), :meth:`Engine.store_new`,
  :meth:`Engine.end_lease`, :meth:`Engine.end_hold`,
  :meth:`Engine.take_over`, :meth:`Engine.terminate` (a pid's non-detached
  leases and every hold), :meth:`Engine.expire` (ttl), :meth:`Engine.reap`
  and :meth:`Engine.advise_of_pid` (liveness); in batches, for a store
  that commits between them (:class:`BatchEnds`, :class:`OwnerEnds`):
  :meth:`Engine.end_leases`, :meth:`Engine.expire_batch`,
  :meth:`Engine.expire_all` (ttl) and :meth:`Engine.end_owner` (every
  lease and hold of one owner, however the backend names owners);
- the retain-or-delete decision when content becomes unreferenced
  (:meth:`Engine.settle`, :meth:`Engine.trim_retained`);
- making room under ``max_bytes`` (:meth:`Engine.make_room`; the plan
  alone, :meth:`Engine.plan_room`): the eviction plan is decided before
  anything is deleted, so StoreFull leaves everything as it was;
- the reap schedule (:class:`ReapSchedule`) and the read checks
  (:meth:`Engine.check_read`: the size always, the hash with
  ``verify_reads``).

The policies themselves are data (:class:`~blobleases.policies.Policies`)
and small pure functions (:mod:`blobleases.policy_rules`).

Every Engine method runs inside one transaction of the backend (its lock,
or its ``BEGIN IMMEDIATE``), which the backend opens around the call: the
engine takes no lock, reads no file and keeps no state but the reap
schedule, so a verb's effects are visible to the verbs called after it and
all of them commit (or roll back) together. A backend whose store is shared
by many processes (Directory) implements only the verbs its SQL does not
do in bulk; see each verb.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from . import policy_rules
from .content_id import ContentId
from .errors import IntegrityError, StoreFull
from .lease_id import LeaseId
from .liveness import same_start
from .policies import Policies

__all__ = [
    "Adapter",
    "BatchEnds",
    "EndAdapter",
    "Engine",
    "ExpiryQueue",
    "LeaseAdds",
    "LeaseEnds",
    "LeaseRemover",
    "OwnerEnds",
    "ReapSchedule",
    "RoomAdapter",
]

K = TypeVar("K")  # a backend's key for one content (a ContentId, an index key)
# a backend's name for an owner of leases and holds (a pid, a lock-file token)
O_contra = TypeVar("O_contra", contravariant=True)
Own = TypeVar("Own")
H = TypeVar("H")  # a backend's id of one reader hold
# A backend's reference to one lease in a batch: (key, LeaseId) for most;
# DirectoryStorage's index keeps its rows' text (parsing 10,000 lease ids
# cost a reap of 10,000 leases a third of its time).
L = TypeVar("L")

ALL = sys.maxsize  # a batch limit: everything at once


class RoomAdapter(Protocol[K]):
    """The verbs the retain-or-delete decision and :meth:`Engine.make_room`
    need: what every backend implements, shared or not."""

    def unreferenced_size(self, key: K) -> int | None:
        """The size of content ``key`` if it is present, not retained, and
        has no unexpired lease and no reader hold; else None."""
        ...

    def delete_if_unreferenced(self, key: K) -> None:
        """Delete content ``key`` (as :meth:`delete_content`) if and only if
        :meth:`unreferenced_size` would give a size: one atomic step, for
        stores that retain nothing."""
        ...

    def delete_content(self, key: K) -> int:
        """Delete content ``key`` with every lease and reader hold on it
        (its bytes go when the transaction commits; a reader already open
        keeps its view); the bytes freed, 0 if it was absent."""
        ...

    def count_evictions(self, blobs: int, freed: int) -> None:
        """Count ``blobs`` contents evicted to make room, ``freed`` bytes in
        all (the store-wide totals of ``stats()``; counted with the deletions,
        in the same transaction)."""
        ...

    def retain(self, key: K) -> None:
        """Make unreferenced content ``key`` retained, the most recently
        used of the retained LRU; its expired leases, if any, go."""
        ...

    def retained_bytes(self) -> int:
        """The total size of retained content."""
        ...

    def retained_oldest_first(self) -> Iterable[tuple[K, int]]:
        """Retained content (key, size), least recently retained first; may
        be a lazy cursor read only as far as needed."""
        ...

    def evictable_oldest_first(self) -> Iterable[tuple[K, int, bool]]:
        """Content that is not retained (key, size, has_reader), least
        recently used first; may be lazy (and may omit content with a
        reader)."""
        ...

    def total_bytes(self) -> int:
        """The total size of present content, retained content included."""
        ...


class LeaseRemover(RoomAdapter[K], Protocol[K]):
    """The verb :meth:`Engine.end_lease` needs beyond :class:`RoomAdapter`'s:
    the ending of one lease (every backend whose lease ends the engine
    decides implements it)."""

    def remove_lease(self, key: K, lid: LeaseId) -> bool:
        """End ``(lid, key)`` if held (a no-op otherwise, never touching
        another lease); True if ``key`` is now unreferenced (present, no
        lease, no reader hold)."""
        ...


class LeaseEnds(LeaseRemover[K], Protocol[K]):
    """The verbs :meth:`Engine.end_lease` and :meth:`Engine.expire` need
    beyond :class:`RoomAdapter`'s: what a backend implements whose other
    lease verbs are its own statements (PostgresStorage); every
    :class:`Adapter` has them."""

    def expired_leases(self, now: float) -> list[tuple[K, LeaseId]]:
        """The held leases whose ``expires_at <= now`` (taken out of any
        expiry index, not yet ended)."""
        ...


class BatchEnds(RoomAdapter[K], Protocol[K, L]):
    """The verbs :meth:`Engine.end_leases`, :meth:`Engine.expire_batch` and
    :meth:`Engine.expire_all` need beyond :class:`RoomAdapter`'s: leases
    found and ended a batch at a time (one statement each in SQL)."""

    def expired_batch(self, now: float, limit: int) -> list[L]:
        """At most ``limit`` held leases whose ``expires_at <= now``, not yet
        ended (taken out of any expiry index); fewer than ``limit`` only if
        no other is left."""
        ...

    def remove_leases(self, batch: list[L]) -> Iterable[K]:
        """End every lease of ``batch`` that is held (the others are no-ops,
        no other lease is touched); the key of every content this may have
        left unreferenced, each once (it may also give keys still referenced:
        settling those is a no-op)."""
        ...


class OwnerEnds(BatchEnds[K, L], Protocol[K, L, O_contra, H]):
    """The verbs :meth:`Engine.end_owner` needs beyond :class:`BatchEnds`'s:
    the leases and holds (ids ``H``) of one owner (a pid for MemoryStorage;
    a lock-file token or a selection of pid owners for DirectoryStorage's
    index; a host/pid name for PostgresStorage)."""

    def owner_leases(self, owner: O_contra, limit: int) -> list[L]:
        """At most ``limit`` non-detached leases of ``owner``; fewer than
        ``limit`` only if it has no other."""
        ...

    def owner_holds(self, owner: O_contra, limit: int) -> list[H]:
        """At most ``limit`` reader holds of ``owner``; fewer than ``limit``
        only if it has no other."""
        ...

    def remove_holds(self, holds: list[H]) -> Iterable[K]:
        """End every reader hold of ``holds`` not ended yet; the key of every
        content this may have left unreferenced, each once (as
        :meth:`BatchEnds.remove_leases`)."""
        ...


class LeaseAdds(RoomAdapter[K], Protocol[K]):
    """The verbs :meth:`Engine.hold`, :meth:`Engine.store_hit` and
    :meth:`Engine.store_new` need beyond :class:`RoomAdapter`'s: what a
    backend implements whose other lease verbs are its own statements
    (PostgresStorage); every :class:`Adapter` has them."""

    def add_content(self, key: K, size: int, payload: Any) -> None:
        """As :meth:`Adapter.add_content`."""
        ...

    def add_lease(
        self, key: K, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> int | None:
        """As :meth:`Adapter.add_lease`."""
        ...

    def has_lease(self, key: K, lid: LeaseId) -> bool:
        """As :meth:`Adapter.has_lease`."""
        ...

    def count_dedup(self) -> None:
        """As :meth:`Adapter.count_dedup`."""
        ...


class EndAdapter(LeaseRemover[K], Protocol[K]):
    """The verbs :meth:`Engine.end_lease` and :meth:`Engine.end_hold` need:
    :class:`RoomAdapter`'s and the ending of one lease or one reader hold
    (what DirectoryStorage's index implements beside its bulk statements)."""

    def remove_hold(self, hold: int) -> K | None:
        """End the reader hold ``hold`` (a no-op if ended); the content's key
        if that left it unreferenced, else None."""
        ...


class Adapter(EndAdapter[K], LeaseAdds[K], OwnerEnds[K, tuple[K, LeaseId], int, int], Protocol[K]):
    """Every verb of a backend whose leases the engine runs (MemoryStorage):
    :class:`RoomAdapter`'s and the lease, hold and process verbs (its
    owners are pids)."""

    def add_content(self, key: K, size: int, payload: Any) -> None:
        """Make absent content ``key`` present (``size`` bytes, ``payload``
        as the backend's store gave it), unreferenced until a lease is added
        in the same transaction; counts toward :meth:`total_bytes`."""
        ...

    def add_lease(
        self, key: K, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> int | None:
        """Hold ``(lid, key)`` if ``key`` is present and return its size;
        None (nothing held) if absent. A lease already held is left as it
        was (its size is returned). Retained content stops being retained.
        Records an access (for the LRU; it may be batched)."""
        ...

    def has_lease(self, key: K, lid: LeaseId) -> bool:
        """Whether ``(lid, key)`` is held and unexpired."""
        ...

    def owner_pids(self) -> set[int]:
        """Pids of other processes that hold non-detached leases or reader holds."""
        ...

    def is_alive(self, pid: int) -> bool:
        """Whether ``pid`` is the live process that took its leases (its
        recorded start time, so a reused pid is dead)."""
        ...

    def recorded_start(self, pid: int) -> float | None:
        """The start time recorded for ``pid``, None if none is."""
        ...

    def record_pid(self, pid: int, start: float | None) -> None:
        """Record ``pid`` as alive with ``start`` (None: forget it)."""
        ...

    def count_dedup(self) -> None:
        """Count one store that found its content present."""
        ...


class ReapSchedule:
    """When the next automatic reap is due: ``reap_interval`` seconds after
    the last one (SPEC 2.7). Clock-agnostic: a backend passes the clock it
    uses (monotonic for one process, wall time for a shared index)."""

    __slots__ = ("interval", "next")

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.next = now + interval

    def due(self, now: float) -> bool:
        return now >= self.next

    def reaped(self, now: float) -> None:
        """A reap ran at ``now``."""
        self.next = now + self.interval

    def due_after(self, last_reap: float, now: float) -> bool:
        """With a reap time shared by many processes: whether one is due now
        (also when the shared time is ahead of this clock by over a second:
        the clock stepped back); if not, the next is ``interval`` after it."""
        if now - last_reap >= self.interval or last_reap > now + 1.0:
            return True
        self.next = last_reap + self.interval
        return False

    def never(self) -> None:
        """No automatic reap (a read-only handle)."""
        self.next = float("inf")


class Engine(Generic[K]):
    """The rules of SPEC sections 2 and 3 over an adapter (see the module docstring)."""

    __slots__ = ("max_bytes", "on_full", "reaps", "retain_bytes", "verify_reads")

    def __init__(self, policies: Policies, now: float) -> None:
        self.max_bytes = policies.max_bytes
        self.on_full = policies.on_full
        self.retain_bytes = policies.retain_bytes
        self.verify_reads = policies.verify_reads
        self.reaps = ReapSchedule(policies.reap_interval, now)

    # -- leases and holds (SPEC 2.1, 2.2, 2.4, 2.5) --------------------------------

    def hold(
        self, a: LeaseAdds[K], key: K, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int | None:
        """Hold ``(lid, key)`` (a no-op if held): its size, None if absent."""
        if ttl is None:
            return a.add_lease(key, lid, None, detached)
        return a.add_lease(key, lid, policy_rules.expires_at(ttl, time.time()), detached)

    def store_hit(
        self, a: LeaseAdds[K], key: K, lid: LeaseId, ttl: float | None, detached: bool
    ) -> bool:
        """A store of present content: hold the lease, counting a dedup hit
        unless it was held already (then nothing changes). False, having
        done nothing, if the content is absent."""
        if a.has_lease(key, lid):
            return True
        if self.hold(a, key, lid, ttl, detached) is None:
            return False
        a.count_dedup()
        return True

    def store_new(
        self,
        a: LeaseAdds[K],
        key: K,
        size: int,
        payload: Any,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
    ) -> None:
        """A store of absent content whose bytes checked out: make room
        (StoreFull changes nothing), add it and hold the lease, together."""
        self.make_room(a, size)
        a.add_content(key, size, payload)
        self.hold(a, key, lid, ttl, detached)

    def end_lease(self, a: LeaseRemover[K], key: K, lid: LeaseId) -> None:
        """End ``(lid, key)`` (a no-op if not held); settle its content."""
        if a.remove_lease(key, lid):
            self.settle(a, key)

    def end_hold(self, a: EndAdapter[K], hold: int) -> None:
        """End a reader hold (a no-op if ended); settle its content."""
        key = a.remove_hold(hold)
        if key is not None:
            self.settle(a, key)

    def take_over(self, a: Adapter[K], key: K, old: LeaseId, new: LeaseId) -> int | None:
        """Hold ``new`` (no ttl, not detached), then end ``old``: the content
        is never unreferenced in between. None, holding nothing, if absent."""
        size = a.add_lease(key, new, None, False)
        if size is not None:
            self.end_lease(a, key, old)
        return size

    # -- processes and ttl (SPEC 2.6-2.8) ---------------------------------------------

    def terminate(self, a: Adapter[K], pid: int) -> tuple[int, int]:
        """End every non-detached lease and every reader hold of ``pid``:
        (leases ended, holds ended)."""
        return self.end_owner(a, pid)

    def expire(self, a: LeaseEnds[K], now: float) -> int:
        """End every lease whose ttl has run out by ``now``: how many (one
        lease at a time; :meth:`expire_all` in batches)."""
        expired = a.expired_leases(now)
        for key, lid in expired:
            self.end_lease(a, key, lid)
        return len(expired)

    def end_leases(self, a: BatchEnds[K, L], batch: list[L]) -> int:
        """End the leases of ``batch`` (each held one: a snapshot the
        adapter gave in this transaction) and settle every content left
        unreferenced: how many."""
        if batch:
            for key in a.remove_leases(batch):
                self.settle(a, key)
        return len(batch)

    def expire_batch(self, a: BatchEnds[K, L], now: float, limit: int = ALL) -> int:
        """End at most ``limit`` leases whose ttl has run out by ``now``
        (their content settled): how many; fewer than ``limit``: none is
        left."""
        return self.end_leases(a, a.expired_batch(now, limit))

    def expire_all(
        self,
        a: BatchEnds[K, L],
        now: float,
        limit: int = ALL,
        between: Callable[[], None] | None = None,
    ) -> int:
        """End every lease whose ttl has run out by ``now``, ``limit`` at a
        time, calling ``between`` between batches (where a shared store may
        commit: each batch leaves it consistent): how many."""
        ended = 0
        while True:
            count = self.expire_batch(a, now, limit)
            ended += count
            if count < limit:
                return ended
            if between is not None:
                between()

    def end_owner(
        self,
        a: OwnerEnds[K, L, Own, H],
        owner: Own,
        limit: int = ALL,
        between: Callable[[], None] | None = None,
    ) -> tuple[int, int]:
        """End every non-detached lease and every reader hold of ``owner``
        (dead, or a pid reused), ``limit`` at a time, settling each content
        left unreferenced and calling ``between`` between batches (as
        :meth:`expire_all`): (leases ended, holds ended). Its record, if
        the backend keeps one, is the caller's to forget."""
        leases = holds = 0
        while True:
            count = self.end_leases(a, a.owner_leases(owner, limit))
            leases += count
            if count < limit:
                break
            if between is not None:
                between()
        while True:
            batch = a.owner_holds(owner, limit)
            if batch:
                for key in a.remove_holds(batch):
                    self.settle(a, key)
            holds += len(batch)
            if len(batch) < limit:
                return leases, holds
            if between is not None:
                between()

    def reap(self, a: Adapter[K], now: float) -> tuple[int, int, int]:
        """End the leases and holds of every dead process (its record goes
        too); ``now`` on the schedule's clock. (leases, holds, processes)."""
        self.reaps.reaped(now)
        leases = holds = procs = 0
        for pid in a.owner_pids():
            if a.is_alive(pid):
                continue
            ended_leases, ended_holds = self.terminate(a, pid)
            leases += ended_leases
            holds += ended_holds
            procs += 1
            a.record_pid(pid, None)
        return leases, holds, procs

    def advise_of_pid(self, a: Adapter[K], pid: int, start: float | None) -> None:
        """``pid`` is alive and started at ``start`` (None: it is dead, a
        no-op). A different recorded start means the pid was reused: the
        earlier process's leases and holds end."""
        if start is None:
            return
        if not same_start(a.recorded_start(pid), start):
            self.terminate(a, pid)
        a.record_pid(pid, start)

    def advise_pid_terminated(self, a: Adapter[K], pid: int) -> None:
        """``pid`` has exited: its non-detached leases and holds end now."""
        self.terminate(a, pid)
        a.record_pid(pid, None)

    # -- retention and room (SPEC 2.5, 3) ---------------------------------------------

    def settle(self, a: RoomAdapter[K], key: K) -> None:
        """Content that may have become unreferenced is retained (when it fits
        ``retain_bytes``; the oldest retained content then goes beyond the
        budget) or deleted; referenced content is left alone."""
        if self.retain_bytes <= 0:
            a.delete_if_unreferenced(key)
            return
        size = a.unreferenced_size(key)
        if size is None:
            return
        if policy_rules.retains(size, self.retain_bytes):
            a.retain(key)
            self.trim_retained(a, self.retain_bytes)
        else:
            a.delete_content(key)

    def trim_retained(self, a: RoomAdapter[K], budget: int) -> tuple[int, int]:
        """Delete the oldest retained content until the retained total is
        within ``budget``: (blobs deleted, bytes freed)."""
        total = a.retained_bytes()
        if total <= budget:
            return 0, 0
        victims = policy_rules.over_retain_budget(total, budget, a.retained_oldest_first())
        freed = 0
        for key in victims:
            freed += a.delete_content(key)
        return len(victims), freed

    def make_room(self, a: RoomAdapter[K], size: int) -> None:
        """Evict per ``on_full`` so ``size`` more bytes fit under
        ``max_bytes``, or raise StoreFull having deleted nothing (the whole
        plan is made before the first deletion)."""
        victims = self.plan_room(a, size)
        if victims:
            freed = sum(a.delete_content(key) for key in victims)
            a.count_evictions(len(victims), freed)

    def plan_room(self, a: RoomAdapter[K], size: int) -> list[K]:
        """The contents :meth:`make_room` would evict so ``size`` more bytes
        fit under ``max_bytes`` (none when they fit), deleting nothing; or
        StoreFull. A backend that checks early, before it writes bytes it
        would then have to remove, asks this first."""
        limit = self.max_bytes
        if limit is None:
            return []
        total = a.total_bytes()
        if total + size <= limit:
            return []
        if size > limit:
            raise StoreFull(policy_rules.too_large_message(size, limit))
        victims = policy_rules.plan_eviction(
            total + size - limit,
            a.retained_oldest_first(),
            a.evictable_oldest_first(),
            self.on_full,
        )
        if victims is None:
            raise StoreFull(policy_rules.over_limit_message(size, limit, total, self.on_full))
        return victims

    # -- reads (SPEC 2.3) ---------------------------------------------------------------

    def check_read(self, cid: ContentId, data: Any, size: int, length: int) -> None:
        """A read of ``cid`` got ``length`` bytes (``data``, a buffer) where
        ``size`` are recorded: IntegrityError unless they match and, with
        ``verify_reads``, ``data`` hashes to ``cid``. Never partial or
        wrong bytes."""
        if length != size:
            raise IntegrityError(f"blob {cid} holds {length} bytes, not its recorded {size}")
        if self.verify_reads and not cid.matches(data):
            raise IntegrityError(f"the bytes of blob {cid} do not hash to its id")


class ExpiryQueue(list[tuple[float, str, K, LeaseId]]):
    """The ttl leases of a one-process store, soonest expiry first (a heap,
    truthy while any entry is queued: a cheap test for the hot path). An
    entry stays when its lease ends early; :meth:`due` hands it out anyway,
    and the adapter's ``expired_leases`` keeps only leases still held with
    that expiry."""

    __slots__ = ()

    def push(self, expires_at: float, key: K, lid: LeaseId) -> None:
        heapq.heappush(self, (expires_at, str(lid), key, lid))

    def due(self, now: float) -> Iterator[tuple[float, K, LeaseId]]:
        """Take out every entry whose expiry is ``<= now``: (expires_at, key, lease)."""
        while self and self[0][0] <= now:
            expires_at, _, key, lid = heapq.heappop(self)
            yield expires_at, key, lid
