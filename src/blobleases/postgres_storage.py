"""PostgresStorage: the index in PostgreSQL, the bytes in a blob tier (S3 or
a directory every host mounts), shared by processes on many hosts.

Tables, in a schema named after the namespace:

* ``content``: one row per present blob (content id text, size, created,
  last access, ``retained``: NULL while referenced, else its place in the
  retention LRU);
* ``leases``: one row per lease (content id, lease id, pid, expiry,
  detached, ``owner``); ``holds``: one row per open reader;
* ``owners``: one row per process that holds leases or readers (or was
  vouched for by ``advise_of_pid``): ``<host id>.ns<pid namespace>/<pid>``,
  its start time and its last heartbeat, in the *server's* clock (so host
  clocks need not agree);
* ``uploads``: blobs being uploaded (content id, writer, token), written
  before the first byte goes to the tier; ``deleting``: objects whose row
  is gone and whose deletion from the tier has not been confirmed;
* ``meta``: dedup hits.

**Transactions.** Every change is one PostgreSQL transaction at READ
COMMITTED, serialized per content by a transaction-scoped advisory lock
(``pg_advisory_xact_lock`` on a 64-bit hash of namespace and content id),
taken as the first statement so every later statement sees what the
previous holder committed. Taking a lease takes it *shared* (many
processes lease one hot blob at once); dropping, reading's release,
storing, deleting take it exclusive. Why not SERIALIZABLE: the changes
that must not interleave (the last lease dropped while a new one is taken;
a delete while an upload of the same content starts) touch rows that may
not exist yet, which only predicate locks would cover, and a serialization
failure would abort and retry the losers, so a hot blob's lease traffic
would retry under contention; a lock waits instead, is released by the
server when a client dies (SIGKILL included), and bounds every wait with
``lock_timeout`` (then StorageError naming the content waited for). The
byte total under ``max_bytes`` and the retention budget are kept under one
more advisory lock of the namespace, taken after a content's lock; victims
of eviction are only *try*-locked while it is held, so no two transactions
wait on each other in a cycle.

**Rules.** The decisions of SPEC sections 2 and 3 are those of
:class:`blobleases.engine.Engine` (retain or delete content left
unreferenced, the eviction plan, made before anything is deleted so that
StoreFull changes nothing, dedup counting, ttl expiry, the reap schedule),
run inside these transactions over ``_Room`` and ``_Leases``, its adapter
(the statements shared with the SQLite index are in
:mod:`blobleases.index_sql`). Taking a lease of this process and dropping
a lease are one round trip each (``_SQL_ACQUIRE``, ``drop_lease``); dead
owners are judged as RedisStorage judges them (:func:`liveness.is_dead`).

**Bytes.** A blob is uploaded to the tier under its content id (an
``uploads`` row first, so a crash leaves a leftover that ``collect()``
removes) before the transaction that inserts its content row commits; an
object is deleted only after the transaction that removed its row commits
(a ``deleting`` row, removed when the tier confirms). An upload of content
whose object is being deleted waits for that deletion; a deletion while an
upload of the same content is in flight leaves the object to the uploader.

**Liveness** as RedisStorage: each process beats its ``owners`` row every
``heartbeat_ttl / 5`` seconds from a daemon thread; any client ends the
leases and reader holds of an owner whose beat is older than
``heartbeat_ttl`` (and, of this host and pid namespace, of a pid that is
dead or started at another time, at once).

Fork safe: a forked child opens its own connections and tier client; the
parent's sockets are never used, nor closed, by the child.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import gil_free, index_sql, policy_rules, rehash
from .blob_tier import BlobTier, ObjectMissing, ObjectShort, open_tier
from .content_id import ContentId, new_hasher
from .engine import Engine
from .errors import ContentNotFound, IntegrityError, StorageError
from .lease_id import LeaseId
from .liveness import (
    HeartbeatThread,
    can_judge_pids,
    is_dead,
    pid_namespace,
    process_start_time,
    same_start,
    vouch,
)
from .policies import check_seconds
from .reader import BlobReader, RangeSource
from .redis_storage import default_host_id
from .reports import BlobInfo, CollectReport, LeaseInfo, StorageStats, VerifyReport
from .storage import BlobStorage, FileSource, check_hash
from .urls import without_password

__all__ = ["PostgresStorage"]

try:
    import psycopg
    import psycopg.errors
    from psycopg import sql
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "PostgresStorage needs psycopg 3: pip install 'blobleases[postgres]'"
    ) from _exc

_P = ParamSpec("_P")
_R = TypeVar("_R")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DEFAULT_NAMESPACE = "blobleases"
_READ_AHEAD = 4 << 20
_BATCH = 200
#: Rows per statement of the listings (iter_content, verify, collect): what
#: bounds their client memory, whatever the store holds.
_PAGE = 1000
_SCHEMA_VERSION = 1
#: Pools inherited across fork: kept referenced, never closed, in the child.
_INHERITED: list[Any] = []
#: (namespace, content id) of the object deletions this process is making now.
_IN_FLIGHT: set[tuple[str, str]] = set()
_IN_FLIGHT_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key text PRIMARY KEY, value double precision NOT NULL);
CREATE TABLE IF NOT EXISTS content(
    cid text PRIMARY KEY,
    size bigint NOT NULL,
    created double precision NOT NULL,
    last_access double precision NOT NULL,
    retained bigint
);
CREATE INDEX IF NOT EXISTS content_retained ON content(retained) WHERE retained IS NOT NULL;
CREATE INDEX IF NOT EXISTS content_lru ON content(last_access, cid);
CREATE INDEX IF NOT EXISTS content_bytewise ON content((cid COLLATE "C"));
CREATE TABLE IF NOT EXISTS leases(
    cid text NOT NULL,
    lid text NOT NULL,
    pid integer NOT NULL,
    expires_at double precision,
    detached boolean NOT NULL,
    owner text NOT NULL,
    PRIMARY KEY (cid, lid)
);
CREATE INDEX IF NOT EXISTS leases_owner ON leases(owner) WHERE NOT detached;
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS holds(id text PRIMARY KEY, cid text NOT NULL, owner text NOT NULL);
CREATE INDEX IF NOT EXISTS holds_cid ON holds(cid);
CREATE INDEX IF NOT EXISTS holds_owner ON holds(owner);
CREATE TABLE IF NOT EXISTS owners(
    owner text PRIMARY KEY,
    start double precision NOT NULL,
    beat double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads(
    token text PRIMARY KEY,
    cid text NOT NULL,
    owner text NOT NULL,
    started double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_cid ON uploads(cid);
CREATE TABLE IF NOT EXISTS deleting(
    cid text PRIMARY KEY,
    token text NOT NULL,
    owner text NOT NULL,
    since double precision NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS retained_seq;
INSERT INTO meta(key, value) VALUES ('dedup_hits', 0), ('schema_version', 1)
    ON CONFLICT (key) DO NOTHING;
"""

#: Ends one lease under the content's advisory lock and row lock (each
#: statement of a PL/pgSQL function sees what committed before it): 0 not
#: held, 1 ended and the content still referenced, 2 ended and left
#: unreferenced (the caller settles it).
_FUNCTIONS = """
CREATE OR REPLACE FUNCTION drop_lease(
    p_cid text, p_lid text, p_key bigint, p_now double precision
) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_key);
    PERFORM 1 FROM content WHERE cid = p_cid FOR UPDATE;
    DELETE FROM leases WHERE cid = p_cid AND lid = p_lid;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF EXISTS (SELECT 1 FROM leases WHERE cid = p_cid
               AND (expires_at IS NULL OR expires_at > p_now))
       OR EXISTS (SELECT 1 FROM holds WHERE cid = p_cid) THEN
        RETURN 1;
    END IF;
    RETURN 2;
END
$$
"""

#: Holds a lease in one statement (see PostgresStorage._acquire): (size or
#: NULL if absent, 1 if the lease is new).
_SQL_ACQUIRE = """
WITH c AS (SELECT size, retained FROM content WHERE cid = %(cid)s FOR SHARE),
ins AS (
    INSERT INTO leases(cid, lid, pid, expires_at, detached, owner)
    SELECT %(cid)s, %(lid)s, %(pid)s, %(exp)s, %(det)s, %(owner)s FROM c
    ON CONFLICT (cid, lid) DO UPDATE SET expires_at = EXCLUDED.expires_at,
        detached = EXCLUDED.detached, owner = EXCLUDED.owner
    WHERE leases.expires_at IS NOT NULL AND leases.expires_at <= %(now)s
    RETURNING 1
),
un AS (
    UPDATE content SET retained = NULL
    WHERE cid = %(cid)s AND retained IS NOT NULL AND EXISTS (SELECT 1 FROM c)
)
SELECT (SELECT size FROM c), (SELECT count(*) FROM ins)
"""

_NOW = "extract(epoch from clock_timestamp())"
_HELD = "(expires_at IS NULL OR expires_at > %(now)s)"


def _lock_key(namespace: str, name: str) -> int:
    digest = hashlib.blake2b(f"{namespace}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _storage_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """PostgreSQL and pool failures as StorageError, chained."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except psycopg.errors.LockNotAvailable as exc:
            raise StorageError(
                f"waited lock_timeout for a lock held by another PostgreSQL session: {exc}"
            ) from exc
        except psycopg.errors.QueryCanceled as exc:
            raise StorageError(f"PostgreSQL: the statement timed out: {exc}") from exc
        except PoolTimeout as exc:
            raise StorageError(f"PostgreSQL: no connection within lock_timeout: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    return wrapper


class _Heartbeat(HeartbeatThread):
    """This process's owner row (and those of local pids this handle vouches
    for), beaten every ``ttl / 5`` seconds."""

    def __init__(self, storage: PostgresStorage, ttl: float) -> None:
        super().__init__(ttl / 5)
        self.ref = weakref.ref(storage)
        self.owner = storage._owner(self.pid)
        self.start_beating("blobleases-pg-heartbeat")

    def beat(self) -> None:
        storage = self.ref()
        if storage is None:
            return
        rows = [(self.owner, self.start)]
        rows += [(storage._owner(pid), start) for pid, start in self.live_adopted()]
        storage._beat(rows)


class _Watch:
    """One connection's deadline: past it, the watchdog shuts its socket
    down, so a statement waiting on a server that does not answer fails."""

    __slots__ = ("conn", "deadline", "killed", "seconds")

    def __init__(self, conn: Any, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.killed = False

    def rearm(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(Exception):
            fd = self.conn.pgconn.socket
            # a duplicate of the descriptor: shutdown() acts on the socket
            # itself, close() only on the duplicate
            with socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread per process that ends statements (and commits)
    the server leaves unanswered past their deadline: PostgreSQL bounds
    its own lock waits by ``lock_timeout``, a stopped or unplugged server
    bounds nothing, and libpq has no client-side statement timeout."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[int, _Watch] = {}
        self.pid = -1

    def arm(self, conn: Any, seconds: float) -> _Watch:
        watch = _Watch(conn, seconds)
        with self.lock:
            if self.pid != os.getpid():
                self.pid = os.getpid()
                self.entries = {}
                threading.Thread(
                    target=self._run, name="blobleases-pg-watchdog", daemon=True
                ).start()
            self.entries[id(watch)] = watch
        return watch

    def disarm(self, watch: _Watch) -> None:
        with self.lock:
            self.entries.pop(id(watch), None)

    def _run(self) -> None:
        pid = os.getpid()
        while os.getpid() == pid:
            time.sleep(0.1)
            now = time.monotonic()
            with self.lock:
                due = [w for w in self.entries.values() if w.deadline < now and not w.killed]
            for watch in due:
                watch.kill()


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=lambda: setattr(_WATCHDOG, "lock", threading.Lock()))


class _Tx:
    """One transaction's cursor, its start time and what to do after it
    commits (object deletions)."""

    __slots__ = ("cur", "deleted", "doomed", "evicted", "freed", "now", "watch")

    def __init__(self, cur: Any, watch: _Watch) -> None:
        self.cur = cur
        self.watch = watch
        self.now = time.time()
        self.doomed: list[tuple[str, str]] = []  # (cid text, deleting token)
        self.deleted = 0
        self.freed = 0
        self.evicted = (0, 0)  # (blobs, bytes) evicted to make room

    def one(self, query: str, params: Any = None) -> Any:
        self.watch.rearm()
        self.cur.execute(query, params)
        return self.cur.fetchone()

    def all(self, query: str, params: Any = None) -> list[Any]:
        self.watch.rearm()
        self.cur.execute(query, params)
        return list(self.cur.fetchall())

    def rows(self, query: str, params: Any = None) -> list[Any]:
        """The rows of a query that returns some, else ``[rowcount]``."""
        self.watch.rearm()
        self.cur.execute(query, params)
        if self.cur.description is None:
            return [int(self.cur.rowcount)]
        return list(self.cur.fetchall())

    def run(self, query: Any, params: Any = None) -> int:
        self.watch.rearm()
        self.cur.execute(query, params)
        return int(self.cur.rowcount)


def _pg(statement: str) -> str:
    return index_sql.for_postgres(statement)


_SQL_CONTENT_LOCKED = _pg(index_sql.CONTENT + " FOR UPDATE")
_SQL_REFERENCED = _pg(index_sql.REFERENCED)
_SQL_DELETE_UNREFERENCED = _pg(index_sql.DELETE_UNREFERENCED)
_SQL_RETAINED_IN_ORDER = _pg(index_sql.RETAINED_IN_ORDER)
_SQL_EVICTABLE_IN_ORDER = _pg(index_sql.EVICTABLE_IN_ORDER)
_SQL_RETAINED_BYTES = _pg(index_sql.RETAINED_BYTES)
_SQL_TOTAL_BYTES = _pg(index_sql.TOTAL_BYTES)
#: A candidate for eviction, its row locked: (size, retained, has a reader).
_SQL_CANDIDATE = (
    "SELECT c.size, c.retained IS NOT NULL, EXISTS (SELECT 1 FROM holds h WHERE h.cid = c.cid) "
    "FROM content c WHERE c.cid = %s FOR UPDATE"
)


class _Room:
    """The verbs of :class:`blobleases.engine.RoomAdapter` in one
    transaction ``tx`` of a PostgresStorage (keys: content ids as text):
    the engine decides retain-or-delete and the eviction plan, these run
    the SQL. The content settled is locked (exclusive) by the caller.

    Each statement at READ COMMITTED sees what committed before it, so a
    content's row is locked (FOR UPDATE) *before* the statement that finds
    it unreferenced: a lease taken meanwhile (``_SQL_ACQUIRE`` locks the row
    FOR SHARE) is then seen, or waits and finds the row gone. The byte and
    retention totals are read under the namespace's budget lock, taken at
    the first total. With ``locking`` (the default), the retained and
    evictable content is only *try*-locked, then checked again under its
    row lock: content locked by another transaction, or changed since the
    listing, is passed over (so no two transactions wait on each other in
    a cycle, and the plan is made of what is there). Without ``locking``,
    nothing is locked (a plan only, as the index stands)."""

    __slots__ = ("budget_locked", "locking", "storage", "tx")

    def __init__(self, storage: PostgresStorage, tx: _Tx, *, locking: bool = True) -> None:
        self.storage, self.tx, self.locking = storage, tx, locking
        self.budget_locked = not locking

    def _lock_budget(self) -> None:
        if not self.budget_locked:
            self.storage._lock_global(self.tx)
            self.budget_locked = True

    def unreferenced_size(self, key: str) -> int | None:
        tx = self.tx
        row = tx.one(_SQL_CONTENT_LOCKED, (key,))
        if row is None or row[1] is not None:
            return None
        if tx.one(_SQL_REFERENCED, {"cid": key, "now": tx.now})[0]:
            return None
        return int(row[0])

    def delete_if_unreferenced(self, key: str) -> None:
        tx = self.tx
        if tx.one(_SQL_CONTENT_LOCKED, (key,)) is None:
            return
        rows = tx.all(_SQL_DELETE_UNREFERENCED, {"cid": key, "now": tx.now})
        if rows:
            self.storage._deleted(tx, key, int(rows[0][0]))

    def delete_content(self, key: str) -> int:
        return self.storage._delete(self.tx, key)

    def count_evictions(self, blobs: int, freed: int) -> None:
        self.tx.run(
            "INSERT INTO meta(key, value) VALUES ('evictions', %s), ('evicted_bytes', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = meta.value + EXCLUDED.value",
            (blobs, freed),
        )
        # counted by this handle once the transaction commits
        self.tx.evicted = (self.tx.evicted[0] + blobs, self.tx.evicted[1] + freed)

    def retain(self, key: str) -> None:
        self.tx.run("DELETE FROM leases WHERE cid = %s", (key,))  # expired ones
        self.tx.run("UPDATE content SET retained = nextval('retained_seq') WHERE cid = %s", (key,))

    def retained_bytes(self) -> int:
        self._lock_budget()
        return int(self.tx.one(_SQL_RETAINED_BYTES)[0])

    def total_bytes(self) -> int:
        self._lock_budget()
        return int(self.tx.one(_SQL_TOTAL_BYTES)[0])

    def _candidate(self, key: str) -> tuple[int, bool, bool] | None:
        """(size, retained, has a reader) of content this transaction could
        lock now (None if another holds it, or it is gone)."""
        if not self.storage._try_lock(self.tx, key):
            return None
        row = self.tx.one(_SQL_CANDIDATE, (key,))
        return None if row is None else (int(row[0]), bool(row[1]), bool(row[2]))

    def retained_oldest_first(self) -> Iterator[tuple[str, int]]:
        for key, size in self.tx.all(_SQL_RETAINED_IN_ORDER):
            if not self.locking:
                yield key, int(size)
                continue
            now = self._candidate(key)
            if now is not None and now[1]:
                yield key, now[0]

    def evictable_oldest_first(self) -> Iterator[tuple[str, int, bool]]:
        for key, size in self.tx.all(_SQL_EVICTABLE_IN_ORDER):
            if not self.locking:
                yield key, int(size), False
                continue
            now = self._candidate(key)
            if now is not None and not now[1]:
                yield key, now[0], now[2]


class _Leases(_Room):
    """:class:`_Room` and the verbs of :class:`blobleases.engine.LeaseAdds`
    and :class:`blobleases.engine.LeaseEnds` (the content a lease is added
    to or removed from is locked by the caller; :meth:`expired_leases`
    looks at the contents ``cids`` only, and locks them in sorted order: at
    most ``_BATCH`` in one transaction)."""

    __slots__ = ("cids",)

    def __init__(self, storage: PostgresStorage, tx: _Tx, cids: list[str] | None = None) -> None:
        super().__init__(storage, tx)
        self.cids = cids or []

    def add_content(self, key: str, size: int, payload: Any) -> None:
        now = self.tx.now
        self.tx.run(
            "INSERT INTO content(cid, size, created, last_access) VALUES (%s, %s, %s, %s)",
            (key, size, now, now),
        )

    def add_lease(
        self, key: str, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> int | None:
        return self.storage._hold(self.tx, key, lid, expires_at, detached)[0]

    def has_lease(self, key: str, lid: LeaseId) -> bool:
        tx = self.tx
        row = tx.one(
            f"SELECT 1 FROM leases WHERE cid = %(cid)s AND lid = %(lid)s AND {_HELD}",
            {"cid": key, "lid": str(lid), "now": tx.now},
        )
        return row is not None

    def count_dedup(self) -> None:
        self.tx.run("UPDATE meta SET value = value + 1 WHERE key = 'dedup_hits'")

    def expired_leases(self, now: float) -> list[tuple[str, LeaseId]]:
        for cid_text in self.cids:
            self.storage._lock_content(self.tx, cid_text)
        rows = self.tx.all(
            "SELECT cid, lid FROM leases WHERE cid = ANY(%s) AND expires_at IS NOT NULL "
            "AND expires_at <= %s ORDER BY cid, lid",
            (self.cids, now),
        )
        return [(cid_text, LeaseId.parse(lid)) for cid_text, lid in rows]

    def remove_lease(self, key: str, lid: LeaseId) -> bool:
        tx = self.tx
        if not tx.run("DELETE FROM leases WHERE cid = %s AND lid = %s", (key, str(lid))):
            return False
        return not tx.one(_SQL_REFERENCED, {"cid": key, "now": tx.now})[0]


class _OwnerRows(_Room):
    """:class:`_Room` and the verbs of :class:`blobleases.engine.OwnerEnds`
    over the rows of the contents ``cids`` only (locked by the caller, in
    sorted order: at most ``_BATCH`` in one transaction); owners are the
    ``owner`` column (``host.nsN/pid``), hold ids text."""

    __slots__ = ("cids",)

    def __init__(self, storage: PostgresStorage, tx: _Tx, cids: list[str]) -> None:
        super().__init__(storage, tx)
        self.cids = cids

    def _leases(self, where: str, params: tuple[Any, ...]) -> list[tuple[str, LeaseId]]:
        rows = self.tx.all(
            f"SELECT cid, lid FROM leases WHERE cid = ANY(%s) AND {where} ORDER BY cid, lid "
            "LIMIT %s",
            (self.cids, *params),
        )
        return [(cid_text, LeaseId.parse(lid)) for cid_text, lid in rows]

    def expired_batch(self, now: float, limit: int) -> list[tuple[str, LeaseId]]:
        return self._leases("expires_at IS NOT NULL AND expires_at <= %s", (now, limit))

    def owner_leases(self, owner: str, limit: int) -> list[tuple[str, LeaseId]]:
        return self._leases("owner = %s AND NOT detached", (owner, limit))

    def remove_leases(self, batch: list[tuple[str, LeaseId]]) -> list[str]:
        keys = [key for key, _ in batch]
        self.tx.run(
            "DELETE FROM leases WHERE (cid, lid) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            (keys, [str(lid) for _, lid in batch]),
        )
        return list(dict.fromkeys(keys))

    def owner_holds(self, owner: str, limit: int) -> list[str]:
        rows = self.tx.all(
            "SELECT id FROM holds WHERE cid = ANY(%s) AND owner = %s ORDER BY id LIMIT %s",
            (self.cids, owner, limit),
        )
        return [str(row[0]) for row in rows]

    def remove_holds(self, holds: list[str]) -> list[str]:
        rows = self.tx.all("DELETE FROM holds WHERE id = ANY(%s) RETURNING cid", (holds,))
        return list(dict.fromkeys(str(row[0]) for row in rows))


class PostgresStorage(BlobStorage):
    """Leases and the index in PostgreSQL, bytes in S3 or a shared directory.

    ``dsn``: a ``postgresql://`` url (or libpq conninfo); ``blobs``:
    ``s3://bucket/prefix`` (endpoint from ``?endpoint=`` or
    ``AWS_ENDPOINT_URL``, credentials from the AWS environment variables) or
    an absolute directory path every host mounts. ``namespace`` names the
    PostgreSQL schema (stores on one database are separate by namespace);
    ``heartbeat_ttl``: how long a process may go silent before other hosts
    reap its leases; ``host_id``: this machine's name (default
    :func:`~blobleases.redis_storage.default_host_id`); ``pool_size``: the
    most connections this handle opens. Takes every policy of
    :class:`~blobleases.policies.Policies`; ``lock_timeout`` bounds every
    lock wait, connection wait and tier request.

    Consistency: every index change is one transaction; a blob's bytes are
    in the tier before the row that makes them visible commits, and leave
    it only after the row that removed them committed, so a lease never
    names bytes that are not there (unless removed behind the store's back:
    then IntegrityError, never wrong bytes).
    """

    def __init__(
        self,
        dsn: str,
        *,
        blobs: str,
        namespace: str = _DEFAULT_NAMESPACE,
        heartbeat_ttl: float = 15.0,
        host_id: str | None = None,
        pool_size: int = 8,
        **policies: Any,
    ) -> None:
        super().__init__(**policies)
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, not {type(dsn).__name__}")
        if not dsn:
            raise ValueError("dsn must not be empty")
        if not isinstance(blobs, str):
            raise TypeError(f"blobs must be a str, not {type(blobs).__name__}")
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1-64 letters, digits, '.', '_' or '-', not {namespace!r}"
            )
        host = default_host_id() if host_id is None else host_id
        if not isinstance(host, str) or not _NAME.fullmatch(host):
            raise ValueError(
                f"host_id must be 1-64 letters, digits, '.', '_' or '-', not {host_id!r}"
            )
        if isinstance(pool_size, bool) or not isinstance(pool_size, int):
            raise TypeError(f"pool_size must be an int, not {type(pool_size).__name__}")
        if not 1 <= pool_size <= 1000:
            raise ValueError(f"pool_size must be between 1 and 1000, not {pool_size}")
        self._hb_ttl = check_seconds(heartbeat_ttl, "heartbeat_ttl")
        if self._hb_ttl <= 0:
            raise ValueError(f"heartbeat_ttl must be positive, not {heartbeat_ttl!r}")
        self._namespace = namespace
        self.host_id = host
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout = float(self.policies.lock_timeout)
        # a statement's server-side lock wait ends at lock_timeout; past this
        # the server is taken for one that does not answer
        self._answer_timeout = self._timeout + 0.5
        self._tier: BlobTier = open_tier(
            blobs, timeout=max(self._timeout, 1.0), durable=self.policies.durability == "safe"
        )
        self._url = self._make_url()
        self._global_key = _lock_key(namespace, "\0global")
        self._lock = threading.RLock()
        self._reap_lock = threading.Lock()
        self._closed = False
        self._pool_obj: Any = None
        self._pool_pid = -1
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._heartbeat: _Heartbeat | None = None
        self._touches: dict[str, float] = {}
        self._active_uploads: set[str] = set()
        self._engine: Engine[str] = Engine(self.policies, time.monotonic())
        self._next_expiry = 0.0
        try:
            self._create_schema()
            self._ensure_process()
        except BaseException:
            self._close_pool()
            raise
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(ref))
        weakref.finalize(self, _finish_at_exit, ref)

    # -- identity --------------------------------------------------------------

    def _make_url(self) -> str:
        parts = urlsplit(self._dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            # a conninfo string: carried whole in the url's query
            query = urlencode(self._url_options({"dsn": self._dsn}))
            return f"postgresql://?{query}"
        own = [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k not in ("blobs", "namespace", "heartbeat_ttl", "host_id")
        ]
        extra = self._url_options({})
        return urlunsplit(parts._replace(query=urlencode(own + list(extra.items()))))

    def _url_options(self, base: dict[str, str]) -> dict[str, str]:
        out = dict(base)
        out["blobs"] = self._tier.url
        if self._namespace != _DEFAULT_NAMESPACE:
            out["namespace"] = self._namespace
        if self._hb_ttl != 15.0:
            out["heartbeat_ttl"] = repr(self._hb_ttl)
        return out

    @property
    def url(self) -> str:
        """The url that reopens this store (``postgresql://...?blobs=...``)."""
        return self._url

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def tier(self) -> BlobTier:
        """The blob tier (for tests and tools)."""
        return self._tier

    def __repr__(self) -> str:
        return f"<PostgresStorage {without_password(self._url)}>"

    # -- connections -----------------------------------------------------------

    def _conninfo(self) -> str:
        parts = urlsplit(self._dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            return self._dsn
        rest = [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k not in ("blobs", "namespace", "heartbeat_ttl", "host_id", "dsn")
        ]
        return urlunsplit(parts._replace(query=urlencode(rest)))

    def _configure(self, conn: Any) -> None:
        self._conns.add(conn)
        ms = max(int(self._timeout * 1000), 1)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self._namespace)))
        conn.execute(f"SET lock_timeout = {ms}")
        conn.execute(f"SET idle_in_transaction_session_timeout = {max(ms * 4, 60_000)}")
        if self.policies.durability == "safe":
            conn.execute("SET synchronous_commit = on")

    def _check_connection(self, conn: Any) -> None:
        """The pool's check of an idle connection before it is handed out,
        under the watchdog (a server that does not answer fails it)."""
        watch = _WATCHDOG.arm(conn, self._answer_timeout)
        try:
            conn.execute("SELECT 1")
        finally:
            _WATCHDOG.disarm(watch)

    def _pool(self) -> Any:
        """This process's connection pool (a forked child opens its own)."""
        if self._pool_pid == os.getpid() and self._pool_obj is not None:
            return self._pool_obj
        with self._lock:
            if self._closed:
                raise StorageError("the storage is closed")
            if self._pool_pid != os.getpid() or self._pool_obj is None:
                connect_timeout = max(math.ceil(min(self._timeout, 30.0)), 2)
                pool = ConnectionPool(
                    self._conninfo(),
                    min_size=1,
                    max_size=self._pool_size,
                    open=False,
                    configure=self._configure,
                    timeout=max(self._timeout, 1.0),
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": connect_timeout,
                        "keepalives": 1,
                        "keepalives_idle": 5,
                        "keepalives_interval": 2,
                        "keepalives_count": 3,
                        "tcp_user_timeout": int(max(self._timeout, 1.0) * 1000),
                    },
                    name=f"blobleases-{self._namespace}",
                    reconnect_timeout=max(self._timeout, 1.0),
                )
                try:
                    pool.open(wait=True, timeout=max(self._timeout, 1.0))
                except PoolTimeout as exc:
                    with contextlib.suppress(Exception):
                        pool.close(timeout=0)
                    raise StorageError(
                        f"cannot connect to PostgreSQL at {self._safe_dsn()} within "
                        f"lock_timeout={self._timeout}s"
                    ) from exc
                self._pool_obj = pool
                self._pool_pid = os.getpid()
        return self._pool_obj

    def _safe_dsn(self) -> str:
        return without_password(self._conninfo())

    def _tx(self, work: Callable[[_Tx], _R], *, attempts: int = 3, single: bool = False) -> _R:
        """Run ``work`` in one transaction (retried from the start when the
        server broke the connection or chose it as a deadlock victim), then
        the object deletions it scheduled. ``single``: ``work`` runs one
        statement, which is its own transaction (autocommit)."""
        for attempt in range(attempts):
            watch: _Watch | None = None
            tx: _Tx | None = None
            try:
                with self._pool().connection() as conn:
                    watch = _WATCHDOG.arm(conn, self._answer_timeout)
                    try:
                        if single:
                            with conn.cursor() as cur:
                                tx = _Tx(cur, watch)
                                result = work(tx)
                        else:
                            with conn.transaction(), conn.cursor() as cur:
                                tx = _Tx(cur, watch)
                                result = work(tx)
                                watch.rearm()  # for the commit
                    finally:
                        _WATCHDOG.disarm(watch)
            except BaseException as exc:
                if tx is not None and tx.doomed:  # rolled back: nothing to delete
                    with _IN_FLIGHT_LOCK:
                        for cid_text, _token in tx.doomed:
                            _IN_FLIGHT.discard((self._namespace, cid_text))
                if not isinstance(exc, psycopg.Error):
                    raise
                retry: psycopg.Error | None = exc
            else:
                retry = None
            if retry is None:
                assert tx is not None
                self._note_evictions(*tx.evicted)
                for cid_text, token in tx.doomed:
                    self._finish_delete(cid_text, token)
                return result
            try:
                raise retry
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == attempts - 1:
                    raise
                continue
            except psycopg.OperationalError as exc:
                if watch is not None and watch.killed:
                    raise StorageError(
                        f"PostgreSQL at {self._safe_dsn()} did not answer within "
                        f"lock_timeout={self._timeout}s"
                    ) from exc
                if attempt == attempts - 1 or isinstance(
                    exc, (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)
                ):
                    raise
                time.sleep(0.05 * (attempt + 1))
                continue
        raise AssertionError("unreachable")  # pragma: no cover

    def _exec(self, query: str, params: Any = None) -> list[Any]:
        """One statement outside a transaction (autocommit); its rows."""
        return self._tx(lambda tx: tx.rows(query, params), single=True)

    def _create_schema(self) -> None:
        def work(tx: _Tx) -> None:
            tx.run("SELECT pg_advisory_xact_lock(%s)", (self._global_key,))
            tx.run(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._namespace))
            )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.run(statement)
            tx.run(_FUNCTIONS)
            row = tx.one("SELECT value FROM meta WHERE key = 'schema_version'")
            if row is not None and int(row[0]) > _SCHEMA_VERSION:
                raise StorageError(
                    f"namespace {self._namespace!r} has schema version {int(row[0])}; this "
                    f"blobleases knows {_SCHEMA_VERSION}: upgrade blobleases"
                )

        try:
            self._tx(work)
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot open PostgreSQL store {self._safe_dsn()} (namespace "
                f"{self._namespace!r}): {exc}"
            ) from exc

    # -- owners and liveness -----------------------------------------------------

    @property
    def _local(self) -> str:
        return f"{self.host_id}.ns{pid_namespace()}"

    def _owner(self, pid: int) -> str:
        return f"{self._local}/{pid}"

    def _beat(self, rows: list[tuple[str, float]]) -> None:
        self._tx(
            lambda tx: tx.cur.executemany(
                f"INSERT INTO owners(owner, start, beat) VALUES (%s, %s, {_NOW}) "
                "ON CONFLICT (owner) DO UPDATE SET beat = EXCLUDED.beat",
                rows,
            )
        )

    def _ensure_process(self) -> None:
        """Start this process's heartbeat (again, in a forked child)."""
        if self._heartbeat is not None and self._heartbeat.pid == os.getpid():
            return
        with self._lock:
            if self._heartbeat is not None and self._heartbeat.pid == os.getpid():
                return
            heartbeat = _Heartbeat(self, self._hb_ttl)
            self._heartbeat = heartbeat
            weakref.finalize(self, heartbeat.stop.set)

    def _vouch(self, pid: int) -> float:
        """Record a local pid as alive (its beat kept by this handle); its
        start time (0.0 if unknown or dead)."""
        assert self._heartbeat is not None
        return vouch(self._heartbeat, pid)

    def _is_dead(self, owner: str, start: float, fresh: bool) -> bool:
        return is_dead(owner, start, fresh, self._local, self._heartbeat)

    def _judge(self, owners: Iterable[str]) -> set[str]:
        """The dead among ``owners`` (an owner without a row is judged by
        its pid when local, else dead)."""
        names = sorted(set(owners))
        if not names:
            return set()
        rows = self._exec(
            f"SELECT owner, start, {_NOW} - beat <= %s FROM owners WHERE owner = ANY(%s)",
            (self._hb_ttl, names),
        )
        known = {r[0]: (float(r[1]), bool(r[2])) for r in rows}
        return {o for o in names if self._is_dead(o, *known.get(o, (0.0, False)))}

    # -- maintenance ---------------------------------------------------------------

    @property
    def _next_reap(self) -> float:
        """When the next automatic reap is due (monotonic clock): the
        engine's reap schedule."""
        return self._engine.reaps.next

    @_next_reap.setter
    def _next_reap(self, when: float) -> None:
        self._engine.reaps.next = when

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the storage is closed")

    def _maintain(self) -> None:
        self._check_open()
        self._ensure_process()
        if time.time() >= self._next_expiry:
            self._expire()
        reaps = self._engine.reaps
        if reaps.due(time.monotonic()) and self._reap_lock.acquire(blocking=False):
            try:
                reaps.reaped(time.monotonic())
                self._reap_dead()
                self._flush_touches()
                self._expire()
            finally:
                self._reap_lock.release()

    def _touch(self, cid_text: str) -> None:
        with self._lock:
            self._touches[cid_text] = time.time()
            flush = len(self._touches) >= _BATCH
        if flush:
            self._flush_touches()

    def _flush_touches(self) -> None:
        with self._lock:
            touches, self._touches = self._touches, {}
        if not touches:
            return
        items = sorted(touches.items())
        self._tx(
            lambda tx: tx.run(
                "UPDATE content c SET last_access = greatest(c.last_access, t.at) "
                "FROM unnest(%s::text[], %s::float8[]) AS t(cid, at) WHERE c.cid = t.cid",
                ([c for c, _ in items], [a for _, a in items]),
            )
        )

    def _expire(self) -> int:
        """End every lease whose ttl has passed; returns how many."""
        ended = 0
        while True:
            now = time.time()
            rows = self._exec(
                "SELECT cid, lid FROM leases WHERE expires_at IS NOT NULL AND expires_at <= %s "
                "ORDER BY cid LIMIT %s",
                (now, _BATCH),
            )
            if rows:
                cids = sorted({r[0] for r in rows})

                def work(tx: _Tx, cids: list[str] = cids) -> int:
                    return self._engine.expire(_Leases(self, tx, cids), tx.now)

                ended += self._tx(work)
            if len(rows) < _BATCH:
                break
        nxt = self._exec("SELECT min(expires_at) FROM leases WHERE expires_at IS NOT NULL")
        self._next_expiry = float(nxt[0][0]) if nxt and nxt[0][0] is not None else math.inf
        return ended

    def _end_many(self, cids: list[str], where: str, params: dict[str, Any]) -> int:
        """End the leases matching ``where`` (and, with ``holds_where`` in
        ``params``, the holds) of each content in ``cids``, in
        transactions of at most ``_BATCH`` contents locked in sorted order."""
        ended = 0
        holds_where = params.pop("holds_where", None)
        for i in range(0, len(cids), _BATCH):
            batch = cids[i : i + _BATCH]

            def work(tx: _Tx, batch: list[str] = batch) -> int:
                args = {**params, "now": tx.now}
                count = 0
                for cid_text in batch:
                    self._lock_content(tx, cid_text)
                    count += tx.run(
                        f"DELETE FROM leases WHERE cid = %(cid)s AND {where}",
                        {**args, "cid": cid_text},
                    )
                    if holds_where is not None:
                        count += tx.run(
                            f"DELETE FROM holds WHERE cid = %(cid)s AND {holds_where}",
                            {**args, "cid": cid_text},
                        )
                    self._settle(tx, cid_text)
                return count

            ended += self._tx(work)
        return ended

    def _reap_dead(self) -> tuple[int, int, int]:
        """End the leases and holds of every dead owner: (leases, readers,
        owners)."""
        rows = self._exec(f"SELECT owner, start, {_NOW} - beat <= %s FROM owners", (self._hb_ttl,))
        leases = readers = count = 0
        for owner, start, fresh in rows:
            if not self._is_dead(owner, float(start), bool(fresh)):
                continue
            nl, nr = self._terminate(owner)
            leases += nl
            readers += nr
            if nl or nr:
                count += 1
            self._exec("DELETE FROM owners WHERE owner = %s AND start = %s", (owner, start))
        return leases, readers, count

    def _terminate(self, owner: str) -> tuple[int, int]:
        """End every non-detached lease and every reader hold of ``owner``
        (the engine decides: :meth:`~blobleases.engine.Engine.end_owner`),
        in transactions of at most ``_BATCH`` contents locked in sorted order."""
        cids = sorted(
            r[0]
            for r in self._exec(
                "SELECT cid FROM leases WHERE owner = %s AND NOT detached "
                "UNION SELECT cid FROM holds WHERE owner = %s",
                (owner, owner),
            )
        )
        leases = readers = 0
        for i in range(0, len(cids), _BATCH):
            batch = cids[i : i + _BATCH]

            def work(tx: _Tx, batch: list[str] = batch) -> tuple[int, int]:
                for cid_text in batch:
                    self._lock_content(tx, cid_text)
                return self._engine.end_owner(_OwnerRows(self, tx, batch), owner)

            ended_leases, ended_holds = self._tx(work)
            leases += ended_leases
            readers += ended_holds
        host, _, pid_text = owner.rpartition("/")
        if host == self._local and self._heartbeat is not None:
            with contextlib.suppress(ValueError):
                self._heartbeat.disown(int(pid_text))
        return leases, readers

    # -- content, under its lock ---------------------------------------------------

    def _lock_content(self, tx: _Tx, cid_text: str, *, shared: bool = False) -> None:
        key = _lock_key(self._namespace, cid_text)
        try:
            if shared:
                tx.one("SELECT pg_advisory_xact_lock_shared(%s)", (key,))
            else:
                tx.one("SELECT pg_advisory_xact_lock(%s)", (key,))
        except psycopg.errors.LockNotAvailable as exc:
            raise StorageError(
                f"waited lock_timeout={self._timeout}s for the lock on content {cid_text} "
                "(held by another PostgreSQL session)"
            ) from exc

    def _lock_global(self, tx: _Tx) -> None:
        try:
            tx.one("SELECT pg_advisory_xact_lock(%s)", (self._global_key,))
        except psycopg.errors.LockNotAvailable as exc:
            raise StorageError(
                f"waited lock_timeout={self._timeout}s for the byte budget lock of namespace "
                f"{self._namespace!r}"
            ) from exc

    def _try_lock(self, tx: _Tx, cid_text: str) -> bool:
        row = tx.one(
            "SELECT pg_try_advisory_xact_lock(%s)", (_lock_key(self._namespace, cid_text),)
        )
        return bool(row[0])

    def _settle(self, tx: _Tx, cid_text: str) -> None:
        """Content (locked) left with no held lease and no reader is
        retained or deleted (the engine decides; see :class:`_Room`)."""
        self._engine.settle(_Room(self, tx), cid_text)

    def _trim_retained(self, tx: _Tx, budget: int) -> None:
        """Delete the oldest retained content beyond ``budget`` (the budget
        lock is taken; retained content locked by others is passed over)."""
        self._engine.trim_retained(_Room(self, tx), budget)

    def _delete(self, tx: _Tx, cid_text: str) -> int:
        """Delete the content (locked) with its leases and holds; its object
        leaves the tier after the transaction commits."""
        rows = tx.all("DELETE FROM content WHERE cid = %s RETURNING size", (cid_text,))
        size = int(rows[0][0]) if rows else None
        self._deleted(tx, cid_text, size)
        return size or 0

    def _deleted(self, tx: _Tx, cid_text: str, size: int | None) -> None:
        """The row of content (locked) is gone (``size``: it had one): its
        leases and holds go, and its object after the commit."""
        tx.run("DELETE FROM leases WHERE cid = %s", (cid_text,))
        tx.run("DELETE FROM holds WHERE cid = %s", (cid_text,))
        self._doom_object(tx, cid_text)
        if size is not None:
            tx.deleted += 1
            tx.freed += size

    def _doom_object(self, tx: _Tx, cid_text: str) -> None:
        """Schedule the deletion of the object of content (locked) that has
        no row, unless an upload of it is in flight (the uploader then owns
        the object) or a deletion is already scheduled."""
        if tx.one("SELECT 1 FROM uploads WHERE cid = %s LIMIT 1", (cid_text,)) is not None:
            return
        token = uuid.uuid4().hex
        inserted = tx.run(
            "INSERT INTO deleting(cid, token, owner, since) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (cid) DO NOTHING",
            (cid_text, token, self._owner(os.getpid()), tx.now),
        )
        if inserted:
            tx.doomed.append((cid_text, token))
            # in flight from now on (before the commit), so no other thread of
            # this process takes the row for a failed deletion's leftover
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.add((self._namespace, cid_text))

    def _finish_delete(self, cid_text: str, token: str) -> None:
        """After the commit: delete the object, then its ``deleting`` row (if
        the tier fails, the row stays and collect() finishes the job)."""
        mark = (self._namespace, cid_text)
        try:
            self._tier.delete(self._tier.key(ContentId.parse(cid_text)))
            self._exec("DELETE FROM deleting WHERE cid = %s AND token = %s", (cid_text, token))
        except (StorageError, psycopg.Error):
            pass
        finally:
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.discard(mark)

    def _hold(
        self, tx: _Tx, cid_text: str, lid: LeaseId, expires: float | None, detached: bool
    ) -> tuple[int | None, bool]:
        """Hold the lease (ending at ``expires``) on content (locked): (its
        size or None if absent, whether the lease is new)."""
        row = tx.one("SELECT size, retained FROM content WHERE cid = %s", (cid_text,))
        if row is None:
            return None, False
        owner = self._owner(lid.pid)
        if not detached and lid.pid != os.getpid():
            start = self._vouch(lid.pid)
            tx.run(
                f"INSERT INTO owners(owner, start, beat) VALUES (%s, %s, {_NOW}) "
                "ON CONFLICT (owner) DO NOTHING",
                (owner, start),
            )
        new = tx.run(
            "INSERT INTO leases(cid, lid, pid, expires_at, detached, owner) "
            "VALUES (%(cid)s, %(lid)s, %(pid)s, %(exp)s, %(det)s, %(owner)s) "
            "ON CONFLICT (cid, lid) DO UPDATE SET expires_at = EXCLUDED.expires_at, "
            "detached = EXCLUDED.detached, owner = EXCLUDED.owner "
            "WHERE leases.expires_at IS NOT NULL AND leases.expires_at <= %(now)s",
            {
                "cid": cid_text,
                "lid": str(lid),
                "pid": lid.pid,
                "exp": expires,
                "det": detached,
                "owner": owner,
                "now": tx.now,
            },
        )
        if row[1] is not None:
            tx.run("UPDATE content SET retained = NULL WHERE cid = %s", (cid_text,))
        if new and expires is not None:
            with self._lock:
                self._next_expiry = min(self._next_expiry, expires)
        return int(row[0]), bool(new)

    def _make_room(self, tx: _Tx, size: int, *, plan_only: bool = False) -> None:
        """Evict per policy so ``size`` more bytes fit under ``max_bytes``
        (the budget lock is taken), or StoreFull with nothing changed;
        victims locked by others are passed over. ``plan_only``: only
        whether they could fit (StoreFull if not), as the index stands,
        locking nothing."""
        if plan_only:
            self._engine.plan_room(_Room(self, tx, locking=False), size)
        else:
            self._engine.make_room(_Room(self, tx), size)

    # -- the backend methods ---------------------------------------------------------

    @_storage_errors
    def _store(
        self,
        cid: ContentId,
        data: memoryview,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        hashed: bool,
    ) -> None:
        self._maintain()
        size = len(data)
        token = self._begin_upload(cid, lid, ttl, detached, size)
        if token is None:
            return
        try:
            if not hashed:
                check_hash(cid, data)
            self._upload(cid, token, size, lambda: _memory_chunks(data))
            self._commit_upload(cid, token, lid, ttl, detached, size)
        except BaseException:
            self._abort_upload(cid, token)
            raise

    def _begin_upload(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool, size: int
    ) -> str | None:
        """Hold the lease if the content is present (a dedup hit: None);
        else record an upload of it (refusing early with StoreFull when it
        cannot fit) and return its token. Waits for a deletion of the same
        object in flight."""
        cid_text = str(cid)
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self._timeout

        def work(tx: _Tx) -> tuple[str, str | None]:
            self._lock_content(tx, cid_text)
            if self._engine.store_hit(_Leases(self, tx), cid_text, lid, ttl, detached):
                return "held", None
            gone = tx.one("SELECT owner, token FROM deleting WHERE cid = %s", (cid_text,))
            if gone is not None:
                return "deleting", gone[0]
            if self.policies.max_bytes is not None:
                self._make_room(tx, size, plan_only=True)
            tx.run(
                "INSERT INTO uploads(token, cid, owner, started) VALUES (%s, %s, %s, %s)",
                (token, cid_text, self._owner(os.getpid()), tx.now),
            )
            return "upload", None

        if self.policies.max_bytes is not None:
            self._flush_touches()  # eviction goes by the recorded accesses
        while True:
            # Marked active before its row can commit: a collect() of another
            # thread that sees the row must never take it for a leftover.
            with self._lock:
                self._active_uploads.add(token)
            try:
                state, deleter = self._tx(work)
            except BaseException:
                with self._lock:
                    self._active_uploads.discard(token)
                raise
            if state == "upload":
                return token
            with self._lock:
                self._active_uploads.discard(token)
            if state == "held":
                self._touch(cid_text)
                return None
            assert deleter is not None
            if deleter == self._owner(os.getpid()):
                with _IN_FLIGHT_LOCK:
                    # a deletion of this process that failed (its row stayed)
                    stale = (self._namespace, cid_text) not in _IN_FLIGHT
            else:
                stale = bool(self._judge([deleter]))
            if stale:
                self._finish_stale_deletion(cid_text)
                continue
            if time.monotonic() > deadline:
                raise StorageError(
                    f"waited lock_timeout={self._timeout}s for the deletion of {cid_text} "
                    f"from the blob tier by {deleter}"
                )
            time.sleep(0.01)

    def _finish_stale_deletion(self, cid_text: str, token: str | None = None) -> bool:
        """A deletion whose process died (or failed): delete the object (if
        no row names it) and the ``deleting`` row (only the one of ``token``
        when given: a newer deletion of the same content is not stale).
        True if a row was removed."""

        def work(tx: _Tx) -> bool:
            self._lock_content(tx, cid_text)
            if token is None:
                row = tx.one("DELETE FROM deleting WHERE cid = %s RETURNING token", (cid_text,))
            else:
                row = tx.one(
                    "DELETE FROM deleting WHERE cid = %s AND token = %s RETURNING token",
                    (cid_text, token),
                )
                if row is None:
                    return False  # finished meanwhile
            if tx.one("SELECT 1 FROM content WHERE cid = %s", (cid_text,)) is None:
                self._tier.delete(self._tier.key(ContentId.parse(cid_text)))
            return row is not None

        return bool(self._tx(work))

    def _upload(
        self, cid: ContentId, token: str, size: int, parts: Callable[[], Iterable[Any]]
    ) -> None:
        """Put the bytes under the content id (not replacing an object that
        is there: it holds the same content, unless broken: its size says)."""
        key = self._tier.key(cid)
        if not self._tier.put(key, parts(), size):
            found = self._tier.size_of(key)
            if found != size:
                # a leftover of another size (no row names it: we hold the
                # upload): replace it
                self._tier.delete(key)
                if not self._tier.put(key, parts(), size):
                    raise StorageError(f"the tier refused a new object for {cid}")

    def _commit_upload(
        self,
        cid: ContentId,
        token: str,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        size: int,
    ) -> None:
        cid_text = str(cid)

        def work(tx: _Tx) -> None:
            self._lock_content(tx, cid_text)
            if tx.run("DELETE FROM uploads WHERE token = %s", (token,)) != 1:
                raise StorageError(
                    f"the upload of {cid_text} was removed meanwhile (its writer was taken "
                    "for dead: heartbeat_ttl too short?)"
                )
            index = _Leases(self, tx)
            # present: stored meanwhile by another process (a dedup hit)
            if not self._engine.store_hit(index, cid_text, lid, ttl, detached):
                self._engine.store_new(index, cid_text, size, None, lid, ttl, detached)

        self._tx(work)
        with self._lock:
            self._active_uploads.discard(token)

    def _abort_upload(self, cid: ContentId, token: str) -> None:
        """Remove the upload record; its object goes unless a row or another
        upload names it (best effort: collect() finishes what fails)."""
        cid_text = str(cid)

        def work(tx: _Tx) -> None:
            self._lock_content(tx, cid_text)
            tx.run("DELETE FROM uploads WHERE token = %s", (token,))
            if tx.one("SELECT 1 FROM content WHERE cid = %s", (cid_text,)) is None:
                self._doom_object(tx, cid_text)

        with contextlib.suppress(Exception):
            self._tx(work)
        with self._lock:
            self._active_uploads.discard(token)

    @_storage_errors
    def _store_file(
        self, source: FileSource, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        self._maintain()
        # the content id must be known before the upload (it is the key)
        with rehash.seekable_source(source) as f:
            return self._store_stream(f, lid, algorithm, ttl, detached)

    def _store_stream(
        self, f: IO[bytes], lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        """Hash a seekable file from its position, then (unless present)
        upload it in bounded memory while hashing again; a file that changed
        in between raises IntegrityError with nothing stored."""
        start, cid, size = rehash.identify(f, algorithm)
        token = self._begin_upload(cid, lid, ttl, detached, size)
        if token is None:
            return cid, size
        try:
            again = rehash.Reread(f, start, size, cid)  # hashes anew at each pass
            self._upload(cid, token, size, lambda: iter(again))
            again.check()
            self._commit_upload(cid, token, lid, ttl, detached, size)
        except BaseException:
            self._abort_upload(cid, token)
            raise
        return cid, size

    @_storage_errors
    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        self._maintain()
        cid_text = str(cid)

        if detached or lid.pid == os.getpid():
            size = self._acquire(cid_text, lid, ttl, detached)
        else:

            def work(tx: _Tx) -> int | None:
                self._lock_content(tx, cid_text, shared=True)
                return self._engine.hold(_Leases(self, tx), cid_text, lid, ttl, detached)

            size = self._tx(work)
        if size is None:
            raise ContentNotFound(cid)
        self._touch(cid_text)
        return size

    @_storage_errors
    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        self._maintain()
        cid_text = str(cid)

        def work(tx: _Tx) -> int | None:
            self._lock_content(tx, cid_text)
            held = tx.one(
                f"SELECT 1 FROM content c WHERE c.cid = %(cid)s AND EXISTS (SELECT 1 FROM "
                f"leases l WHERE l.cid = c.cid AND {_HELD}) OR EXISTS (SELECT 1 FROM holds h "
                "WHERE h.cid = %(cid)s)",
                {"cid": cid_text, "now": tx.now},
            )
            if held is None:
                return None
            size = self._hold(tx, cid_text, new, None, False)[0]
            tx.run("DELETE FROM leases WHERE cid = %s AND lid = %s", (cid_text, str(old)))
            return size

        size = self._tx(work)
        if size is not None:
            self._touch(cid_text)
        return size

    def _acquire(
        self, cid_text: str, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int | None:
        """Hold a lease of this process (or a detached one) in one statement,
        its own transaction: the content row is locked FOR SHARE, so a
        concurrent :meth:`_settle` (FOR UPDATE first) either sees this lease
        or runs first, and then this statement finds the row gone (None) or
        retained (taken back)."""
        now = time.time()
        expires = policy_rules.expires_at(ttl, now)
        rows = self._exec(
            _SQL_ACQUIRE,
            {
                "cid": cid_text,
                "lid": str(lid),
                "pid": lid.pid,
                "exp": expires,
                "det": detached,
                "owner": self._owner(lid.pid),
                "now": now,
            },
        )
        size, new = rows[0]
        if size is not None and new and expires is not None:
            with self._lock:
                self._next_expiry = min(self._next_expiry, expires)
        return None if size is None else int(size)

    def _held_size(self, tx: _Tx, cid_text: str, lid: LeaseId) -> int | None:
        row = tx.one(
            "SELECT c.size FROM content c JOIN leases l ON l.cid = c.cid "
            f"WHERE c.cid = %(cid)s AND l.lid = %(lid)s AND {_HELD}",
            {"cid": cid_text, "lid": str(lid), "now": tx.now},
        )
        return None if row is None else int(row[0])

    def _read_all(self, cid: ContentId, size: int) -> bytes:
        """The whole object, which must have ``size`` bytes (one request: a
        byte past the end is asked for too, so a longer object shows)."""
        key = self._tier.key(cid)
        try:
            if size == 0:
                found = self._tier.size_of(key)
                if found is None:
                    raise ObjectMissing(f"{key} is missing")
                data = b"" if found == 0 else b"?" * min(found, 1)
            else:
                data = self._tier.read_range(key, 0, size + 1, exact=False)
        except ObjectMissing as exc:
            raise IntegrityError(f"the bytes of {cid} are gone from the blob tier: {exc}") from exc
        except ObjectShort as exc:
            raise IntegrityError(f"the bytes of {cid} in the blob tier are short: {exc}") from exc
        if len(data) != size:
            raise IntegrityError(
                f"{cid} has {'more' if len(data) > size else len(data)} bytes in the blob "
                f"tier, not {size}"
            )
        return data

    @_storage_errors
    def _get_data(self, cid: ContentId, lid: LeaseId) -> bytes:
        self._maintain()
        cid_text = str(cid)
        size = self._tx(lambda tx: self._held_size(tx, cid_text, lid), single=True)
        if size is None:
            raise self._lease_expired(cid, lid)
        data = self._read_all(cid, size)
        if self.policies.verify_reads:
            check_hash(cid, data)
        self._touch(cid_text)
        return data

    @_storage_errors
    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        self._maintain()
        cid_text = str(cid)
        hold_id = uuid.uuid4().hex
        owner = self._owner(os.getpid())

        def work(tx: _Tx) -> int | None:
            self._lock_content(tx, cid_text, shared=True)
            size = self._held_size(tx, cid_text, lid)
            if size is not None:
                tx.run(
                    "INSERT INTO holds(id, cid, owner) VALUES (%s, %s, %s)",
                    (hold_id, cid_text, owner),
                )
            return size

        size = self._tx(work)
        if size is None:
            raise self._lease_expired(cid, lid)
        key = self._tier.key(cid)
        try:
            found = self._tier.size_of(key)
            if found is None:
                raise IntegrityError(f"the bytes of {cid} are gone from the blob tier")
            if found != size:
                raise IntegrityError(f"{cid} has {found} bytes in the blob tier, not {size}")
            if self.policies.verify_reads:
                hasher = new_hasher(cid.algorithm)
                for piece in self._tier.iter_object(key, size):
                    hasher.update(piece)
                if hasher.digest() != cid.digest:
                    raise IntegrityError(f"data does not hash to {cid}")
        except BaseException:
            self._release_hold(cid_text, hold_id)
            raise
        self._touch(cid_text)
        pid = os.getpid()
        ref = weakref.ref(self)
        window: list[Any] = [0, b""]

        def fetch(offset: int, length: int) -> bytes:
            storage = ref()
            if storage is None or storage._closed:
                raise StorageError("the storage is closed")
            end = min(offset + length, size)
            if end <= offset:
                return b""
            start, cached = window
            if start <= offset and end <= start + len(cached):
                return gil_free.to_bytes(memoryview(cached)[offset - start : end - start])
            want = min(max(end - offset, _READ_AHEAD), size - offset)
            try:
                data = storage._tier.read_range(key, offset, want)
            except ObjectMissing as exc:
                raise IntegrityError(f"the bytes of {cid} are gone from the blob tier") from exc
            except ObjectShort as exc:
                raise IntegrityError(f"the bytes of {cid} in the blob tier are short") from exc
            window[0], window[1] = offset, data
            return data[: end - offset]

        def release() -> None:
            storage = ref()
            if storage is None or storage._closed or os.getpid() != pid:
                return
            with contextlib.suppress(Exception):
                storage._release_hold(cid_text, hold_id)

        return BlobReader(RangeSource(fetch), size, release)

    def _release_hold(self, cid_text: str, hold_id: str) -> None:
        def work(tx: _Tx) -> None:
            self._lock_content(tx, cid_text)
            if tx.run("DELETE FROM holds WHERE id = %s", (hold_id,)):
                self._settle(tx, cid_text)

        _storage_errors(self._tx)(work)

    @_storage_errors
    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        self._maintain()
        cid_text = str(cid)

        # One call in the common case: the function ends the lease under the
        # content's lock and says whether the content is left unreferenced.
        state = self._exec(
            "SELECT drop_lease(%s, %s, %s, %s)",
            (cid_text, str(lid), _lock_key(self._namespace, cid_text), time.time()),
        )[0][0]
        if state == 2:

            def work(tx: _Tx) -> None:
                self._lock_content(tx, cid_text)
                self._settle(tx, cid_text)

            self._tx(work)

    @_storage_errors
    def _advise_of_pid(self, pid: int) -> None:
        self._maintain()
        if not can_judge_pids():
            return
        start = process_start_time(pid)
        if start is None:
            return
        owner = self._owner(pid)
        known = self._exec("SELECT start FROM owners WHERE owner = %s", (owner,))
        if known and not same_start(float(known[0][0]), start):  # the pid was reused
            self._terminate(owner)
            self._exec("DELETE FROM owners WHERE owner = %s", (owner,))
        self._vouch(pid)
        self._exec(
            f"INSERT INTO owners(owner, start, beat) VALUES (%s, %s, {_NOW}) "
            "ON CONFLICT (owner) DO UPDATE SET start = EXCLUDED.start, beat = EXCLUDED.beat",
            (owner, start),
        )

    @_storage_errors
    def _advise_pid_terminated(self, pid: int) -> None:
        self._maintain()
        owner = self._owner(pid)
        self._terminate(owner)
        if pid != os.getpid():
            self._exec("DELETE FROM owners WHERE owner = %s", (owner,))

    @_storage_errors
    def _contains(self, cid: ContentId) -> bool:
        self._maintain()
        return bool(self._exec("SELECT 1 FROM content WHERE cid = %s", (str(cid),)))

    @_storage_errors
    def _stat(self, cid: ContentId) -> BlobInfo:
        self._maintain()
        now = time.time()
        rows = self._exec(
            "SELECT size, created, last_access, "
            "(SELECT count(*) FROM leases l WHERE l.cid = c.cid AND "
            "(l.expires_at IS NULL OR l.expires_at > %(now)s)), "
            "(SELECT count(*) FROM holds h WHERE h.cid = c.cid) "
            "FROM content c WHERE cid = %(cid)s",
            {"cid": str(cid), "now": now},
        )
        if not rows:
            raise ContentNotFound(cid)
        size, created, last, leases, readers = rows[0]
        last = max(float(last), self._touches.get(str(cid), 0.0))
        return BlobInfo(cid, int(size), int(leases), int(readers), float(created), last)

    @_storage_errors
    def iter_content(self) -> Iterator[ContentId]:
        """Every present content id, in ascending order of its text, read a
        page of rows per statement (client memory bounded whatever the
        store holds): content present all along is listed once; content
        stored or deleted meanwhile may or may not be."""
        self._maintain()
        first = self._content_page("cid", "")
        return (ContentId.parse(r[0]) for page in self._pages("cid", first) for r in page)

    @_storage_errors
    def _iter_content(self) -> list[ContentId]:
        return list(self.iter_content())

    @_storage_errors
    def _content_page(self, columns: str, after: str) -> list[Any]:
        """Up to ``_PAGE`` content rows (``cid`` first) after the content id
        ``after``, in bytewise order (the index ``content_bytewise``, so the
        order is the same whatever the database's collation)."""
        return self._exec(
            f'SELECT {columns} FROM content WHERE cid COLLATE "C" > %s '
            'ORDER BY cid COLLATE "C" LIMIT %s',
            (after, _PAGE),
        )

    def _pages(self, columns: str, first: list[Any] | None = None) -> Iterator[list[Any]]:
        """Every content row, a page at a time (keyset pagination: each page
        its own statement, so no connection is held between pages)."""
        page = self._content_page(columns, "") if first is None else first
        while page:
            yield page
            if len(page) < _PAGE:
                return
            page = self._content_page(columns, page[-1][0])

    @_storage_errors
    def _iter_leases(self) -> list[LeaseInfo]:
        self._maintain()
        rows = self._exec(
            f"SELECT lid, cid, expires_at, detached FROM leases WHERE {_HELD}",
            {"now": time.time()},
        )
        out: list[LeaseInfo] = []
        for lid_text, cid_text, exp, detached in rows:
            lid = LeaseId.parse(lid_text)
            out.append(
                LeaseInfo(
                    lid,
                    ContentId.parse(cid_text),
                    lid.pid,
                    None if exp is None else float(exp),
                    bool(detached),
                )
            )
        return out

    @_storage_errors
    def _stats(self) -> StorageStats:
        self._maintain()
        now = time.time()
        row = self._exec(
            "SELECT (SELECT count(*) FROM content), (SELECT coalesce(sum(size), 0) FROM content), "
            f"(SELECT count(*) FROM leases WHERE {_HELD}), (SELECT count(*) FROM holds), "
            "(SELECT value FROM meta WHERE key = 'dedup_hits'), "
            "(SELECT count(*) FROM content WHERE retained IS NOT NULL), "
            "(SELECT coalesce(sum(size), 0) FROM content WHERE retained IS NOT NULL), "
            "(SELECT value FROM meta WHERE key = 'evictions'), "
            "(SELECT value FROM meta WHERE key = 'evicted_bytes')",
            {"now": now},
        )[0]
        owners = {
            r[0]
            for r in self._exec(
                f"SELECT DISTINCT owner FROM leases WHERE NOT detached AND {_HELD} "
                "UNION SELECT DISTINCT owner FROM holds",
                {"now": now},
            )
        }
        dead = self._judge(owners)
        return StorageStats(
            blobs=int(row[0]),
            bytes=int(row[1]),
            leases=int(row[2]),
            processes=len(owners - dead),
            dedup_hits=int(row[4] or 0),
            readers=int(row[3]),
            retained_blobs=int(row[5]),
            retained_bytes=int(row[6]),
            evictions=int(row[7] or 0),
            evicted_bytes=int(row[8] or 0),
        )

    # -- collect and verify ----------------------------------------------------------

    @_storage_errors
    def _collect(self) -> CollectReport:
        self._check_open()
        self._ensure_process()
        report = CollectReport()
        with self._reap_lock:
            self._flush_touches()
            before = self._exec("SELECT count(*), coalesce(sum(size), 0) FROM content")[0]
            expired = self._expire()
            leases, readers, procs = self._reap_dead()
            # owners of leases, holds and uploads without an owners row
            stray = {
                r[0]
                for r in self._exec(
                    "SELECT owner FROM leases WHERE NOT detached UNION SELECT owner FROM holds "
                    "UNION SELECT owner FROM uploads EXCEPT SELECT owner FROM owners"
                )
            }
            for owner in self._judge(stray):
                nl, nr = self._terminate(owner)
                leases += nl
                readers += nr
                procs += 1 if (nl or nr) else 0
            self._next_reap = time.monotonic() + self.policies.reap_interval
            rows = self._collect_leftovers()
            after = self._exec("SELECT count(*), coalesce(sum(size), 0) FROM content")[0]
        report.leases_reaped = leases + expired
        report.readers_reaped = readers
        report.processes_reaped = procs
        report.blobs_deleted = max(int(before[0]) - int(after[0]), 0)
        report.bytes_freed = max(int(before[1]) - int(after[1]), 0)
        report.rows_removed = rows[0]
        report.files_removed = rows[1]
        return report

    def _collect_leftovers(self) -> tuple[int, int]:
        """Uploads of dead writers, deletions never finished, unreferenced
        content not retained, objects no row names: (rows, objects) removed."""
        rows = objects = 0
        mine = self._owner(os.getpid())
        uploads = self._exec("SELECT token, cid, owner FROM uploads")
        dead = self._judge(o for _, _, o in uploads if o != mine)
        with self._lock:
            active = set(self._active_uploads)
        for token, cid_text, owner in uploads:
            if (owner == mine and token not in active) or owner in dead:
                self._abort_upload(ContentId.parse(cid_text), token)
                rows += 1
        deleting = self._exec("SELECT cid, token, owner FROM deleting")
        dead = self._judge(o for _, _, o in deleting if o != mine)
        for cid_text, token, owner in deleting:
            if owner == mine:
                with _IN_FLIGHT_LOCK:
                    # another thread of this process is deleting the object
                    # now: finishing for it would let an upload of the same
                    # content put its object before that thread's delete
                    if (self._namespace, cid_text) in _IN_FLIGHT:
                        continue
            elif owner not in dead:
                continue
            if self._finish_stale_deletion(cid_text, token):
                rows += 1
        after = ""
        while True:
            loose = [
                r[0]
                for r in self._exec(
                    f"SELECT cid FROM content c WHERE retained IS NULL AND NOT EXISTS (SELECT 1 "
                    f"FROM leases l WHERE l.cid = c.cid AND {_HELD}) AND NOT EXISTS (SELECT 1 "
                    'FROM holds h WHERE h.cid = c.cid) AND cid COLLATE "C" > %(after)s '
                    'ORDER BY cid COLLATE "C" LIMIT %(page)s',
                    {"now": time.time(), "after": after, "page": _PAGE},
                )
            ]
            if loose:
                self._end_many(sorted(loose), "FALSE", {})
            if len(loose) < _PAGE:
                break
            after = loose[-1]
        # leases and holds of content that has no row
        rows += self._exec(
            "DELETE FROM leases l WHERE NOT EXISTS (SELECT 1 FROM content c WHERE c.cid = l.cid)"
        )[0]
        rows += self._exec(
            "DELETE FROM holds h WHERE NOT EXISTS (SELECT 1 FROM content c WHERE c.cid = h.cid)"
        )[0]
        for key, cid in self._orphans():
            if self._remove_orphan(key, cid):
                objects += 1
        if self.policies.retain_bytes >= 0:

            def trim(tx: _Tx) -> None:
                self._lock_global(tx)
                self._trim_retained(tx, self.policies.retain_bytes)

            self._tx(trim)
        return rows, objects

    def _orphans(self) -> Iterator[tuple[str, ContentId | None]]:
        """Objects in the tier that no content row, upload or deletion names,
        as (key, content id or None for a key that names none). An ordered
        merge of the tier's listing (ascending content id) with the content
        rows (a page at a time), so memory stays bounded by a page whatever
        the store holds; the keys no row matched are checked again against
        every table in batches (a row may have committed after its page was
        read). A key out of order (a tier that does not list sorted) is
        checked that way too."""
        rows = (r[0] for page in self._pages("cid") for r in page)
        row: str | None = next(rows, None)
        last = ""
        unmatched: list[tuple[str, ContentId]] = []
        for key, _size in self._tier.list_keys():
            cid = self._tier.cid_of(key)
            if cid is None:
                yield key, None
                continue
            text = str(cid)
            if text >= last:
                last = text
                while row is not None and row < text:
                    row = next(rows, None)
                if row == text:
                    continue
            unmatched.append((key, cid))
            if len(unmatched) >= _PAGE:
                yield from self._unnamed(unmatched)
                unmatched = []
        yield from self._unnamed(unmatched)

    def _unnamed(self, found: list[tuple[str, ContentId]]) -> Iterator[tuple[str, ContentId]]:
        """Those of ``found`` no content row, upload or deletion names now."""
        if not found:
            return
        texts = [str(cid) for _, cid in found]
        named = {
            r[0]
            for r in self._exec(
                "SELECT cid FROM content WHERE cid = ANY(%(c)s) UNION SELECT cid FROM uploads "
                "WHERE cid = ANY(%(c)s) UNION SELECT cid FROM deleting WHERE cid = ANY(%(c)s)",
                {"c": texts},
            )
        }
        for (key, cid), text in zip(found, texts, strict=True):
            if text not in named:
                yield key, cid

    def _remove_orphan(self, key: str, cid: ContentId | None) -> bool:
        if cid is None:
            self._tier.delete(key)
            return True
        cid_text = str(cid)

        def work(tx: _Tx) -> bool:
            self._lock_content(tx, cid_text)
            if (
                tx.one(
                    "SELECT 1 FROM content WHERE cid = %(c)s UNION SELECT 1 FROM uploads WHERE "
                    "cid = %(c)s UNION SELECT 1 FROM deleting WHERE cid = %(c)s",
                    {"c": cid_text},
                )
                is not None
            ):
                return False
            self._doom_object(tx, cid_text)
            return True

        return bool(self._tx(work))

    @_storage_errors
    def _verify(self, repair: bool) -> VerifyReport:
        self._maintain()
        report = VerifyReport()
        for cid_text, size in (r for page in self._pages("cid, size") for r in page):
            report.checked += 1
            cid = ContentId.parse(cid_text)
            key = self._tier.key(cid)
            hasher = new_hasher(cid.algorithm)
            seen = 0
            state = "ok"
            try:  # one request per blob: a missing object raises ObjectMissing
                for piece in self._tier.iter_object(key, int(size)):
                    hasher.update(piece)
                    seen += len(piece)
                if seen != int(size) or hasher.digest() != cid.digest:
                    state = "corrupted"
            except ObjectMissing:
                state = "missing"
            if state == "ok":
                continue
            if not self._exec("SELECT 1 FROM content WHERE cid = %s", (cid_text,)):
                continue  # deleted while it was being read
            (report.missing if state == "missing" else report.corrupted).append(cid)
        orphans = list(self._orphans())  # what is wrong: as long as the report
        report.orphaned.extend(f"{self._tier.url.split('?')[0]}/{k}" for k, _ in orphans)
        if repair and report:
            for cid in report.corrupted + report.missing:
                cid_text = str(cid)

                def work(tx: _Tx, cid_text: str = cid_text) -> None:
                    self._lock_content(tx, cid_text)
                    self._delete(tx, cid_text)

                self._tx(work)
            for key, ocid in orphans:
                self._remove_orphan(key, ocid)
            report.repaired = True
        return report

    # -- closing -----------------------------------------------------------------------

    @_storage_errors
    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._finish()
            self._closed = True
            hb = self._heartbeat
        if hb is not None:
            hb.stop.set()
        self._close_pool()
        self._tier.close()

    def _close_pool(self) -> None:
        pool, self._pool_obj = self._pool_obj, None
        if pool is not None and self._pool_pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.close(timeout=5)

    def _finish(self) -> None:
        """What closing writes (also at interpreter exit for a handle left
        open): recorded accesses, and the end of leases that are due."""
        if self._pool_obj is None or self._pool_pid != os.getpid():
            return
        with contextlib.suppress(Exception):
            self._flush_touches()
        if self._next_expiry <= time.time():
            with contextlib.suppress(Exception):
                self._expire()

    # -- test support ----------------------------------------------------------------

    def _object_key_for_tests(self, cid: ContentId) -> str:
        return self._tier.key(cid)


def _memory_chunks(data: memoryview, size: int = 8 << 20) -> Iterator[memoryview]:
    for off in range(0, len(data), size):
        yield data[off : off + size]


def _finish_at_exit(ref: weakref.ref[PostgresStorage]) -> None:
    storage = ref()
    if storage is not None and not storage._closed:
        storage._finish()


def _after_fork(ref: weakref.ref[PostgresStorage]) -> None:
    """In a forked child: the parent's connections are never used or closed
    here (their sockets are pointed at /dev/null, so a finalizer's goodbye
    reaches nobody), and the pool, locks and tier client are made anew."""
    storage = ref()
    if storage is None:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for conn in list(storage._conns):
            with contextlib.suppress(Exception):
                fd = conn.pgconn.socket
                if fd >= 0:
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    if storage._pool_obj is not None:
        _INHERITED.append(storage._pool_obj)
    storage._pool_obj = None
    storage._pool_pid = -1
    storage._conns = weakref.WeakSet()
    storage._lock = threading.RLock()
    storage._reap_lock = threading.Lock()
    storage._touches = {}
    storage._active_uploads = set()
    storage._tier.after_fork()


def open_postgres(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    """The ``open_storage`` factory of ``postgresql://`` and ``postgres://``
    urls: ``blobs=`` (required), ``namespace=``, ``heartbeat_ttl=``,
    ``host_id=`` and ``dsn=`` (a conninfo string) come from the query; the
    rest goes to libpq."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = dict(query)
    blobs = options.get("blobs")
    if not blobs:
        raise ValueError(
            f"url {url!r}: a PostgreSQL store needs ?blobs=s3://bucket/prefix or a directory"
        )
    kwargs: dict[str, Any] = {"blobs": blobs}
    if "namespace" in options:
        kwargs["namespace"] = options["namespace"]
    if "heartbeat_ttl" in options:
        try:
            kwargs["heartbeat_ttl"] = float(options["heartbeat_ttl"])
        except ValueError:
            raise ValueError(f"url {url!r}: heartbeat_ttl must be a number") from None
    if "host_id" in options:
        kwargs["host_id"] = options["host_id"]
    dsn = options.get("dsn") or url
    return PostgresStorage(dsn, **kwargs, **policies)
