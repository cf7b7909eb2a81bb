"""The lease and reader-hold rows of a :class:`~blobleases.directory.DirectoryStorage`
inside a write transaction: holding a lease, adding and deleting content,
ttl expiry, the reap of dead owners and the end of a pid's rows (the
engine's :meth:`~blobleases.engine.Engine.expire_all` and
:meth:`~blobleases.engine.Engine.end_owner` over :class:`_IndexRoom`'s
batch statements; which owners are dead is judged here, by their lock files
and pids); and the lease checks of read paths."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from .. import policy_rules
from ..content_id import ContentId
from ..errors import ContentNotFound
from ..lease_id import LeaseId
from ..liveness import (
    can_judge_pids,
    is_owner_token,
    probe_owner,
    process_start_time,
    process_token,
    same_start,
)
from .index import (
    _SLICE_KEYS,
    _SQL_ADD_CONTENT,
    _SQL_CONTENT,
    _SQL_EXPIRED,
    _SQL_HELD,
    _SQL_INSERT_FIRST_LEASE,
    _SQL_INSERT_LEASE,
    _SQL_PRESENT_SIZE,
    _Index,
    _IndexRoom,
    _Tx,
)
from .layout import _frees
from .locks import _SQL_ADD_OWNER
from .schema import pid_owner

_SIZE_CACHE_ENTRIES = 1 << 16


class _Leases(_Index):
    """Leases, holds and content rows, in SQL over the index."""

    def _start_of(self, db: sqlite3.Connection, pid: int, now: float) -> float:
        """The start time to record for leases of another ``pid`` (of this
        process's pid namespace); 0.0 if unknown."""
        row = db.execute(
            "SELECT start FROM processes WHERE scope = ? AND pid = ?", (self._scope, pid)
        ).fetchone()
        if row is not None:
            return float(row[0])
        if not can_judge_pids():
            return 0.0  # /proc shows another pid namespace: cannot be known
        start = process_start_time(pid)
        if start is None:
            return 0.0  # dead already: the next reap ends its leases
        db.execute(
            "INSERT OR REPLACE INTO processes(scope, pid, start, seen) VALUES (?, ?, ?, ?)",
            (self._scope, pid, start, now),
        )
        return start

    def _hold(
        self,
        tx: _Tx,
        key: str,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        *,
        first: bool = False,
    ) -> tuple[int | None, bool]:
        """Hold ``(lid, key)``: (the size or None if absent, whether it is
        new). ``first``: the content row was just inserted in ``tx``."""
        db = tx.db
        pid = lid.pid
        if pid == self._mypid:
            owner = self._owner if self._owner_recorded else self._own_owner(db)
            start = self._mystart
        else:
            start = 0.0 if detached else self._start_of(db, pid, tx.now)
            owner = pid_owner(pid, start, self._scope)
            if not detached:
                db.execute(_SQL_ADD_OWNER, (owner, pid, start, self._scope))
        expires = policy_rules.expires_at(ttl, tx.now)
        lkey = str(lid)
        if first:
            db.execute(
                _SQL_INSERT_FIRST_LEASE,
                (key, lkey, pid, start, expires, int(detached), owner, tx.now),
            )
            inserted = 1
        else:
            inserted = db.execute(
                _SQL_INSERT_LEASE,
                {
                    "cid": key,
                    "lid": lkey,
                    "pid": pid,
                    "start": start,
                    "expires": expires,
                    "detached": int(detached),
                    "now": tx.now,
                    "owner": owner,
                },
            ).rowcount
        size = self._sizes.get(key)
        if inserted <= 0 or size is None:
            row = db.execute(_SQL_CONTENT, (key,)).fetchone()
            if row is None:
                return None, False
            size = int(row[0])
            self._cache_size(key, size)
            if inserted <= 0:
                held = db.execute(_SQL_HELD, (key, lkey, tx.now)).fetchone() is not None
                tx.stale = not held
                return (size if held else None), False
        self._access[key] = tx.now
        return size, True

    def _count_dedup(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'dedup_hits'")
        self._note("dedup_hits")

    def _settle(self, tx: _Tx, key: str) -> None:
        """Content left with no lease and no reader is retained or deleted."""
        self._engine.settle(_IndexRoom(self, tx), key)

    def _add_content(self, tx: _Tx, key: str, size: int) -> bool:
        """Add the row of new content ``key`` (making room for it under
        ``max_bytes`` first); False, having changed nothing, if it has a row."""
        db = tx.db
        if self.policies.max_bytes is not None:
            if db.execute(_SQL_CONTENT, (key,)).fetchone() is not None:
                return False
            self._make_room(tx, size)
        if db.execute(_SQL_ADD_CONTENT, {"cid": key, "size": size, "now": tx.now}).rowcount <= 0:
            return False
        if key in tx.doomed:
            # deleted earlier in this transaction: its new file must stay
            tx.doomed = [k for k in tx.doomed if k != key]
        self._cache_size(key, size)
        return True

    def _cache_size(self, key: str, size: int) -> None:
        if len(self._sizes) >= _SIZE_CACHE_ENTRIES:
            self._sizes.clear()
        self._sizes[key] = size

    def _delete(self, tx: _Tx, key: str) -> int:
        """Delete content ``key`` with its leases and holds; its file is
        unlinked after the transaction commits."""
        db = tx.db
        rows = db.execute("DELETE FROM content WHERE cid = ? RETURNING size", (key,)).fetchall()
        db.execute("DELETE FROM leases WHERE cid = ?", (key,))
        db.execute("DELETE FROM holds WHERE cid = ?", (key,))
        tx.doomed.append(key)
        if not rows:
            return 0
        size = int(rows[0][0])
        tx.deleted += 1
        tx.freed += size
        return size

    def _trim_retained(self, tx: _Tx, budget: int) -> None:
        self._engine.trim_retained(_IndexRoom(self, tx), budget)

    def _make_room(self, tx: _Tx, size: int) -> None:
        """Evict per policy so ``size`` more bytes fit under ``max_bytes``
        (which must be set), or raise StoreFull having changed nothing."""
        self._flush_access(tx)  # the LRU order as of now
        self._engine.make_room(_IndexRoom(self, tx), size)

    def _room(self, tx: _Tx) -> _IndexRoom:
        return _IndexRoom(self, tx)

    def _end_owners(self, tx: _Tx, where: str, args: tuple[Any, ...]) -> tuple[int, int]:
        """End the non-detached leases and the reader holds of the owners
        matching ``where`` (through the engine, which settles their content):
        (leases, holds). Thousands of rows (a dead process's) end
        ``_SLICE_KEYS`` at a time, in slices (see _maybe_slice)."""
        return self._engine.end_owner(
            self._room(tx), (where, args), _SLICE_KEYS, lambda: self._maybe_slice(tx)
        )

    def _expire(self, tx: _Tx) -> int:
        """End every expired lease (through the engine), in slices."""
        return self._engine.expire_all(
            self._room(tx), tx.now, _SLICE_KEYS, lambda: self._maybe_slice(tx)
        )

    def _expire_some(self, tx: _Tx, limit: int) -> int:
        """End at most ``limit`` expired leases (and free their content)."""
        return self._engine.expire_batch(self._room(tx), tx.now, limit)

    def _reap(self, tx: _Tx) -> tuple[int, int, int]:
        """End leases and holds of dead owners and expired leases: (leases,
        holds, owners). A lock owner is dead when its lock file is unlocked,
        or missing (for an owner of this pid namespace, only if its pid is
        also dead or started at another time: its file may have been removed
        behind its back); a pid owner of this pid namespace when its pid is
        dead or started at another time; pid owners of other namespaces are
        never judged here. Lock files of dead owners go after ``tx`` commits."""
        db = tx.db
        self._check_owners_dir()
        # every owner of a non-detached lease or a hold has a row (see
        # .schema): a small table, not a scan of every lease
        rows = db.execute("SELECT owner, pid, start, scope FROM owners").fetchall()
        mine = process_token()  # never probe our own lock (closing the probe would drop it)
        scope = self._scope
        judge_pids = can_judge_pids()
        starts: dict[int, float | None] = {}
        dead_owners = leases = holds = 0
        for owner, pid, start, owner_scope in rows:
            if owner == mine:
                continue
            lock_owner = is_owner_token(owner)
            if lock_owner:
                state = probe_owner(self._owners_fd, owner)
                if state:
                    continue
                if state is None and owner_scope == scope and judge_pids:
                    # its file was removed behind its back (it puts it back at
                    # its next reap): in our own namespace its pid can tell
                    if pid not in starts:
                        starts[pid] = process_start_time(pid)
                    current = starts[pid]
                    if current is not None and same_start(start, current):
                        continue
            else:
                if owner_scope != scope or not judge_pids:
                    continue
                if pid not in starts:
                    starts[pid] = process_start_time(pid)
                current = starts[pid]
                if current is not None and same_start(start, current):
                    continue
            ended_leases, ended_holds = self._end_owners(tx, "owner = ?", (owner,))
            db.execute("DELETE FROM owners WHERE owner = ?", (owner,))
            if lock_owner:
                tx.dead_owners.append(owner)
            if ended_leases or ended_holds:
                dead_owners += 1
            leases += ended_leases
            holds += ended_holds
        if judge_pids:
            recorded = db.execute(
                "SELECT pid, start FROM processes WHERE scope = ?", (scope,)
            ).fetchall()
            for pid, start in recorded:
                if pid not in starts:
                    starts[pid] = process_start_time(pid)
                current = starts[pid]
                if current is None or not same_start(start, current):
                    db.execute(
                        "DELETE FROM processes WHERE scope = ? AND pid = ? AND start = ?",
                        (scope, pid, start),
                    )
        leases += self._expire(tx)
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_reap'", (tx.now,))
        self._reaps.reaped(tx.now)
        return leases, holds, dead_owners

    @_frees
    def _auto_reap(self) -> None:
        """Reap if no process has in the last ``reap_interval`` seconds."""
        with self._write(maintain=False) as tx:
            last = tx.db.execute("SELECT value FROM meta WHERE key = 'last_reap'").fetchone()
            if self._reaps.due_after(float(last[0]) if last else 0.0, tx.now):
                self._reap(tx)

    def _is_held(self, cid: ContentId, lid: LeaseId) -> bool:
        with self._lock:
            db = self._conn()
            if self._read_only:
                return self._held_read_only(db, str(cid), str(lid), time.time()) is not None
            return db.execute(_SQL_HELD, (str(cid), str(lid), time.time())).fetchone() is not None

    def _held_read_only(
        self, db: sqlite3.Connection, key: str, lkey: str, now: float
    ) -> int | None:
        """A read-only handle's lease check: the size if ``(lkey, key)`` is
        held in this process or in the index, else None (lock held)."""
        local = (key, lkey)
        if local in self._local_leases:
            expires = self._local_leases[local]
            if expires is None or expires > now:
                row = db.execute(_SQL_CONTENT, (key,)).fetchone()
                return None if row is None else int(row[0])
            del self._local_leases[local]
        row = db.execute(_SQL_HELD, (key, lkey, now)).fetchone()
        return None if row is None else int(row[0])

    def _lease_read_only(self, cid: ContentId, lid: LeaseId, ttl: float | None) -> int:
        """A lease of a read-only handle: held in this process only (the
        store cannot record it), on content that is present."""
        key, lkey = str(cid), str(lid)
        with self._lock:
            db = self._op()
            now = time.time()
            size = self._held_read_only(db, key, lkey, now)
            if size is None:
                row = db.execute(_SQL_PRESENT_SIZE, {"cid": key, "now": now}).fetchone()
                if row is None:
                    raise ContentNotFound(cid)
                size = int(row[0])
            self._local_leases[(key, lkey)] = policy_rules.expires_at(ttl, now)
        return size

    @_frees
    def _read_op(self, *, flush: bool = False) -> sqlite3.Connection:
        """Start a read-only operation (lock held): reap if due, end expired
        leases if any, and (if ``flush``) write recorded accesses."""
        db = self._op()
        if self._read_only:
            return db
        if (flush and self._access) or db.execute(
            _SQL_EXPIRED, (time.time(),)
        ).fetchone() is not None:
            with self._write(maintain=False, flush=flush):
                pass
        return db
