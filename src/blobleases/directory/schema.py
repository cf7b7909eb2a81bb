"""The SQLite index of a :class:`~blobleases.directory.DirectoryStorage`.

One database file (WAL mode) beside the blob files holds these tables:

* ``content``: one row per present blob (canonical content id text, size,
  created, last access, and ``retained``: NULL while referenced, else the
  order in which it became unreferenced, for the retention LRU);
* ``leases``: one row per held lease (content id, lease id, expiry,
  detached, its ``owner``, and for people the pid of the lease id, that
  process's start time and when the lease was taken, ``created``: NULL in
  rows written by a blobleases older than the column, which an open for
  writing adds to an older store of the same schema version);
* ``holds``: one row per open reader (content id, ``owner``, pid, start);
* ``owners``: one row per owner of a non-detached lease or a hold (and some
  that were: rows go when a reap finds the owner dead), keyed by ``owner``,
  with its pid and start time and the ``scope`` (pid namespace and boot,
  see :func:`blobleases.liveness.pid_scope`) of the process that recorded
  it. The periodic reap reads this small table, not every lease;
* ``processes``: pids recorded alive (``advise_of_pid``) with their start
  time, keyed by ``(scope, pid)``: a pid means something only in the
  namespace that recorded it;

plus ``meta`` (schema version, the shared "last reap" time, dedup hits).

An ``owner`` is either a *lock owner*, a 32-hex token naming the lock file
``owners/<token>`` that its process holds an ``fcntl`` lock on (see
:class:`blobleases.liveness.OwnerLock`; its row's pid and start time are
its own, consulted only when its file is missing), or a *pid owner*
``pid:<pid>:<start in microseconds>:<scope>`` for leases taken on behalf of
another pid, judged by pid and start time within ``scope`` only. The code
records an owner's row before any lease or hold naming it, in the same
transaction.

Schema version 2. A store of version 1 (owners keyed by ``(pid, start)``,
no ``owner`` columns) is migrated when opened, in one transaction: its rows
become pid owners of the opening process's scope, and its triggers go. A
blobleases of version 1 still running on a migrated store fails on its
next write (the ``owner`` columns are NOT NULL).

Every write runs in a ``BEGIN IMMEDIATE`` transaction, so writers of all
processes are serialized by SQLite's own locks, which the kernel releases
when a process dies (even by SIGKILL).
"""

from __future__ import annotations

import sqlite3
from urllib.parse import quote

__all__ = [
    "SCHEMA_VERSION",
    "check_schema",
    "connect",
    "create_schema",
    "has_lease_created",
    "pid_owner",
]

SCHEMA_VERSION = 2
_MAX_BUSY_SECONDS = 2_000_000.0  # SQLite's busy timeout is an int of milliseconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS content(
    cid TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    retained INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS content_retained ON content(retained) WHERE retained IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases(
    cid TEXT NOT NULL,
    lid TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start REAL NOT NULL,
    expires_at REAL,
    detached INTEGER NOT NULL,
    owner TEXT NOT NULL,
    created REAL,
    PRIMARY KEY (cid, lid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS holds(
    id INTEGER PRIMARY KEY,
    cid TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start REAL NOT NULL,
    owner TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_cid ON holds(cid);
CREATE TABLE IF NOT EXISTS processes(
    scope TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start REAL NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (scope, pid)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS leases_unretain AFTER INSERT ON leases BEGIN
    UPDATE content SET retained = NULL WHERE cid = NEW.cid AND retained IS NOT NULL;
END;
CREATE TABLE IF NOT EXISTS owners(
    owner TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    start REAL NOT NULL,
    scope TEXT NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta(key, value) VALUES ('last_reap', 0.0);
INSERT OR IGNORE INTO meta(key, value) VALUES ('dedup_hits', 0);
"""


def connect(
    path: str, *, safe: bool, read_only: bool = False, timeout: float = 120.0
) -> sqlite3.Connection:
    """Open the index at ``path`` in autocommit mode (transactions are
    explicit), WAL, with ``synchronous=FULL`` when ``safe`` else ``OFF``;
    SQLite waits at most ``timeout`` seconds for another connection's lock.

    ``read_only``: opened with ``mode=ro``, which reads a WAL index only
    while its ``-wal`` and ``-shm`` files exist (a process has it open
    elsewhere); else (none of them, and none can be made on a read-only
    filesystem) with ``immutable=1``: nobody writes the index then."""
    if read_only:
        return _connect_read_only(path, timeout)
    db = sqlite3.connect(
        path,
        timeout=min(timeout, _MAX_BUSY_SECONDS),
        isolation_level=None,
        check_same_thread=False,
        cached_statements=256,
    )
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch the index to WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={'FULL' if safe else 'OFF'}")
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute("PRAGMA foreign_keys=OFF")
    except BaseException:
        db.close()
        raise
    return db


def _connect_read_only(path: str, timeout: float) -> sqlite3.Connection:
    last: sqlite3.Error | None = None
    for query in ("mode=ro", "mode=ro&immutable=1"):
        db = sqlite3.connect(
            f"file:{quote(path, safe='/')}?{query}",
            uri=True,
            timeout=min(timeout, _MAX_BUSY_SECONDS),
            isolation_level=None,
            check_same_thread=False,
            cached_statements=256,
        )
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            db.close()
            last = exc
            continue
        except BaseException:
            db.close()
            raise
        return db
    assert last is not None
    raise last


def check_schema(db: sqlite3.Connection) -> None:
    """Refuse an index of a newer schema (for a read-only connection, which
    cannot create one)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"the index has schema version {version}; this blobleases knows "
            f"{SCHEMA_VERSION}: upgrade blobleases"
        )
    if version < SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"the index has schema version {version}, older than this blobleases' "
            f"{SCHEMA_VERSION}; open the store once where it is writable to upgrade it"
        )


def _run_script(db: sqlite3.Connection, script: str, params: dict[str, str] | None = None) -> None:
    """Run ``script`` statement by statement inside the open transaction
    (``executescript`` would commit it), binding ``params`` by name where used."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if params and any(f":{name}" in pending for name in params):
                db.execute(pending, params)
            else:
                db.execute(pending)
            pending = ""


_MIGRATE_FROM_1 = """
DROP TRIGGER IF EXISTS leases_owner_insert;
DROP TRIGGER IF EXISTS leases_owner_update;
DROP TRIGGER IF EXISTS holds_owner_insert;
DROP TRIGGER IF EXISTS leases_unretain;
DROP INDEX IF EXISTS leases_owner;
DROP INDEX IF EXISTS holds_owner;
ALTER TABLE leases RENAME TO leases_v1;
ALTER TABLE holds RENAME TO holds_v1;
ALTER TABLE processes RENAME TO processes_v1;
DROP TABLE IF EXISTS owners;
DROP INDEX IF EXISTS leases_expiry;
DROP INDEX IF EXISTS holds_cid;
"""

_MIGRATE_FROM_1_ROWS = """
INSERT INTO leases(cid, lid, pid, start, expires_at, detached, owner)
SELECT cid, lid, pid, start, expires_at, detached,
       'pid:' || pid || ':' || CAST(round(start * 1000000) AS INTEGER) || ':' || :scope
FROM leases_v1;
INSERT INTO holds(id, cid, pid, start, owner)
SELECT id, cid, pid, start,
       'pid:' || pid || ':' || CAST(round(start * 1000000) AS INTEGER) || ':' || :scope
FROM holds_v1;
INSERT INTO processes(scope, pid, start, seen) SELECT :scope, pid, start, seen FROM processes_v1;
INSERT OR IGNORE INTO owners(owner, pid, start, scope)
SELECT owner, pid, start, :scope FROM leases WHERE detached = 0
UNION SELECT owner, pid, start, :scope FROM holds;
DROP TABLE leases_v1;
DROP TABLE holds_v1;
DROP TABLE processes_v1;
"""


def has_lease_created(db: sqlite3.Connection) -> bool:
    """Whether the ``leases`` table has its ``created`` column (a store made
    by an older blobleases gains it when next opened writable)."""
    return any(row[1] == "created" for row in db.execute("PRAGMA table_info(leases)"))


def pid_owner(pid: int, start: float, scope: str) -> str:
    """The owner text of leases taken for ``pid`` (started at ``start``) by
    a process of ``scope`` (as the migration writes it, too)."""
    return f"pid:{pid}:{round(start * 1_000_000)}:{scope}"


def create_schema(db: sqlite3.Connection, scope: str) -> None:
    """Create the tables if they do not exist, migrate a store of version
    1 (its pid owners get ``scope``: see the module docstring); refuse a
    newer schema."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the index has schema version {version}; this blobleases knows "
                f"{SCHEMA_VERSION}: upgrade blobleases"
            )
        migrate = version < 2 and (
            db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leases'"
            ).fetchone()
            is not None
        )
        if migrate:
            _run_script(db, _MIGRATE_FROM_1)
        _run_script(db, _SCHEMA)
        if not has_lease_created(db):
            db.execute("ALTER TABLE leases ADD COLUMN created REAL")
        if migrate:
            _run_script(db, _MIGRATE_FROM_1_ROWS, {"scope": scope})
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
