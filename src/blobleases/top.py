"""What ``blobleases top`` shows: snapshots of a store, the events between
two snapshots, and their rendering (SPEC section 9).

A :class:`Snapshot` is the store's totals, its held leases and the sizes of
the content they hold. :func:`events` compares two: leases that ended (by
expiry, or reaped because their process died), content that was freed or
stored, and evictions (from the store-wide eviction count). Nothing here
changes the store (though, as any operation does, reading it may reap).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from .content_id import ContentId
from .errors import ContentNotFound
from .holders import ProcessFacts, process_facts
from .lease_id import LeaseId
from .reports import LeaseInfo, StorageStats
from .storage import BlobStorage

__all__ = ["Event", "ProcessRow", "Snapshot", "TopState", "events", "take_snapshot"]


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """The leases of one process: how many, and the bytes of the distinct
    content they hold."""

    pid: int
    host: str | None
    local: bool
    name: str
    alive: bool | None
    leases: int
    bytes: int


@dataclass(slots=True)
class Snapshot:
    """One look at a store."""

    at: float
    stats: StorageStats
    leases: dict[tuple[LeaseId, ContentId], LeaseInfo]
    sizes: dict[ContentId, int]
    present: set[ContentId]
    created: dict[ContentId, float] = field(default_factory=dict)

    def processes(self, facts: dict[int, ProcessFacts | None]) -> list[ProcessRow]:
        """One row per process holding leases, most bytes first. ``facts``
        caches process lookups (filled here)."""
        held: dict[tuple[str | None, int], tuple[LeaseInfo, set[ContentId], list[int]]] = {}
        for info in self.leases.values():
            key = (info.host if not info.local else None, info.pid)
            entry = held.setdefault(key, (info, set(), [0]))
            entry[1].add(info.content_id)
            entry[2][0] += 1
        rows = []
        for (_, pid), (info, cids, count) in held.items():
            alive: bool | None = None
            name = "(not local)"
            if info.local:
                if pid not in facts:
                    facts[pid] = process_facts(pid)
                found = facts[pid]
                alive = found is not None
                name = found.name if found is not None else "(exited)"
            rows.append(
                ProcessRow(
                    pid,
                    info.host,
                    info.local,
                    name,
                    alive,
                    count[0],
                    sum(self.sizes.get(c, 0) for c in cids),
                )
            )
        rows.sort(key=lambda r: (-r.bytes, -r.leases, r.pid))
        return rows

    def held_longest(self, limit: int) -> list[tuple[ContentId, int, float | None, int]]:
        """(content id, size, held since, lease count) of the ``limit``
        blobs held longest: since their oldest lease where the backend
        records lease times, else since the blob was stored."""
        since: dict[ContentId, float | None] = {}
        counts: dict[ContentId, int] = {}
        for info in self.leases.values():
            cid = info.content_id
            counts[cid] = counts.get(cid, 0) + 1
            at = info.created_at if info.created_at is not None else self.created.get(cid)
            old = since.get(cid)
            since[cid] = at if old is None or (at is not None and at < old) else old
        order = sorted(since, key=lambda c: (since[c] or self.at, str(c)))
        return [(c, self.sizes.get(c, 0), since[c], counts[c]) for c in order[:limit]]


def take_snapshot(storage: BlobStorage, previous: Snapshot | None = None) -> Snapshot:
    """Look at ``storage`` once. Sizes and creation times of content seen
    before come from ``previous`` (content never changes)."""
    stats = storage.stats()
    leases = {(i.lease_id, i.content_id): i for i in storage.iter_leases()}
    present = set(storage.iter_content())
    sizes: dict[ContentId, int] = {}
    created: dict[ContentId, float] = {}
    old_sizes = previous.sizes if previous is not None else {}
    old_created = previous.created if previous is not None else {}
    for cid in present:
        if cid in old_sizes:
            sizes[cid], created[cid] = old_sizes[cid], old_created[cid]
            continue
        try:
            info = storage.stat(cid)
        except ContentNotFound:
            continue
        sizes[cid], created[cid] = info.size, info.created
    return Snapshot(time.time(), stats, leases, sizes, present, created)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened between two snapshots."""

    at: float
    kind: str  # "stored", "freed", "reaped", "expired", "evicted"
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "text": self.text}


def _size(n: int) -> str:
    from .cli import human_size

    return human_size(n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def events(before: Snapshot, after: Snapshot, names: dict[int, str]) -> list[Event]:
    """What happened between ``before`` and ``after``: leases reaped (their
    local process is gone and they were not detached) or expired, blobs
    stored and freed, and evictions. ``names``: the name each process had
    when last seen alive (a dead one cannot be looked up)."""
    out: list[Event] = []
    now = after.at
    reaped: dict[int, int] = {}
    expired = 0
    for key, info in before.leases.items():
        if key in after.leases:
            continue
        if info.expires_at is not None and info.expires_at <= now:
            expired += 1
        elif info.local and not info.detached and process_facts(info.pid) is None:
            reaped[info.pid] = reaped.get(info.pid, 0) + 1
    for pid, n in sorted(reaped.items()):
        name = f" ({names[pid]})" if pid in names else ""
        out.append(Event(now, "reaped", f"reaped {_plural(n, 'lease')} of dead pid {pid}{name}"))
    if expired:
        out.append(Event(now, "expired", f"{_plural(expired, 'lease')} expired"))
    evicted = after.stats.evictions - before.stats.evictions
    if evicted > 0:
        nbytes = after.stats.evicted_bytes - before.stats.evicted_bytes
        out.append(Event(now, "evicted", f"evicted {_plural(evicted, 'blob')} ({_size(nbytes)})"))
    gone = before.present - after.present
    if gone:
        nbytes = sum(before.sizes.get(c, 0) for c in gone)
        out.append(Event(now, "freed", f"freed {_plural(len(gone), 'blob')} ({_size(nbytes)})"))
    new = after.present - before.present
    if new:
        nbytes = sum(after.sizes.get(c, 0) for c in new)
        out.append(Event(now, "stored", f"stored {_plural(len(new), 'blob')} ({_size(nbytes)})"))
    return out


def _age(since: float | None, now: float) -> str:
    from .cli_ops import duration

    return duration(None if since is None else now - since)


@dataclass(slots=True)
class TopState:
    """The running view: the last snapshot, the events seen, process facts."""

    url: str
    snapshot: Snapshot | None = None
    log: list[Event] = field(default_factory=list)
    facts: dict[int, ProcessFacts | None] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    error: str | None = None
    keep_events: int = 12

    def refresh(self, storage: BlobStorage) -> None:
        """Take a new snapshot and record the events since the last one."""
        snap = take_snapshot(storage, self.snapshot)
        if self.snapshot is not None:
            self.log.extend(events(self.snapshot, snap, self.names))
            del self.log[: -self.keep_events]
        self.snapshot = snap
        self.error = None
        self.facts = {}  # processes are looked up again for each snapshot
        for row in snap.processes(self.facts):
            if row.alive:
                self.names[row.pid] = row.name

    def to_json(self, limit: int = 10) -> dict[str, Any]:
        snap = self.snapshot
        assert snap is not None
        st = snap.stats
        return {
            "store": self.url,
            "at": snap.at,
            "totals": {
                "blobs": st.blobs,
                "bytes": st.bytes,
                "leases": st.leases,
                "readers": st.readers,
                "processes": st.processes,
                "dedup_hits": st.dedup_hits,
                "retained_blobs": st.retained_blobs,
                "retained_bytes": st.retained_bytes,
                "evictions": st.evictions,
                "evicted_bytes": st.evicted_bytes,
            },
            "processes": [
                {
                    "pid": r.pid,
                    "host": r.host,
                    "local": r.local,
                    "name": r.name,
                    "alive": r.alive,
                    "leases": r.leases,
                    "bytes": r.bytes,
                }
                for r in snap.processes(self.facts)
            ],
            "held_longest": [
                {"content_id": str(c), "size": size, "held_since": since, "leases": n}
                for c, size, since, n in snap.held_longest(limit)
            ],
            "events": [e.to_json() for e in self.log],
        }

    def render(self, *, rows: int = 10, footer: str = "") -> RenderableType:
        """The screen: totals, processes, blobs held longest, events."""
        snap = self.snapshot
        parts: list[RenderableType] = []
        stamp = time.strftime("%H:%M:%S")
        parts.append(Text(f"blobleases top  {self.url}  {stamp}", style="bold"))
        if snap is None:
            parts.append(Text(self.error or "reading the store..."))
            return Group(*parts)
        st = snap.stats
        totals = (
            f"blobs {st.blobs}   bytes {_size(st.bytes)}   leases {st.leases}   "
            f"readers {st.readers}   processes {st.processes}   dedup hits {st.dedup_hits}   "
            f"retained {st.retained_blobs} ({_size(st.retained_bytes)})   "
            f"evictions {st.evictions}"
        )
        parts.append(Text(totals))
        procs = _table(
            ("PID", "right"),
            ("PROCESS", "left"),
            ("HOST", "left"),
            ("LEASES", "right"),
            ("BYTES", "right"),
            title_justify="left",
        )
        rows_ = snap.processes(self.facts)
        for r in rows_[:rows]:
            procs.add_row(
                str(r.pid),
                r.name,
                "" if r.local else (r.host or "?"),
                str(r.leases),
                _size(r.bytes),
            )
        more = len(rows_) - rows
        procs.title = "processes" + (f" ({more} more)" if more > 0 else "")
        parts.append(procs)
        held = _table(
            ("CONTENT ID", "left"),
            ("SIZE", "right"),
            ("HELD FOR", "right"),
            ("LEASES", "right"),
            title="held longest",
        )
        for cid, size, since, n in snap.held_longest(rows):
            held.add_row(str(cid)[:23] + "...", _size(size), _age(since, snap.at), str(n))
        parts.append(held)
        parts.append(Text("events", style="bold"))
        parts.extend(_event_lines(self.log))
        if self.error:
            parts.append(Text(f"error: {self.error}", style="red"))
        if footer:
            parts.append(Text(footer, style="dim"))
        return Group(*parts)


def _table(*columns: tuple[str, JustifyMethod], **options: Any) -> Table:
    """A table of the screen (``options`` as rich's Table takes them): a
    rule under the header, no padding at the edges, a column per
    ``(name, justify)``, none wrapped."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, **options)
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    return table


def _event_lines(log: Iterable[Event]) -> list[Text]:
    lines = [Text(f"{time.strftime('%H:%M:%S', time.localtime(e.at))}  {e.text}") for e in log]
    return lines or [Text("(none yet)", style="dim")]
