"""The SQLite index of a :class:`~blobleases.directory.DirectoryStorage`.

One database file (WAL mode) beside the blob files holds four tables:

* ``content``: one row per present blob (canonical content id text, size,
  created, last access, and ``retained``: NULL while referenced, else the
  order in which it became unreferenced, for the retention LRU);
* ``leases``: one row per held lease (content id, lease id, the pid of the
  lease id and that process's start time, expiry, detached);
* ``holds``: one row per open reader (content id, pid, start time);
* ``processes``: pids recorded alive with their start time;

plus ``meta`` (schema version, the shared "last reap" time, dedup hits).

``owners`` lists every ``(pid, start)`` that holds a non-detached lease or
a reader hold (and some that did: rows go when a reap finds the process
dead). Triggers add the row with the lease or hold, inside SQLite, for every
writer (an earlier version of blobleases too); an existing row costs a
look-up and no page write, where an index of leases by owner would cost a
page write per lease. So the periodic reap reads this small table, not every
lease. Every object is created ``IF NOT EXISTS`` whenever a store is opened;
a store made by an earlier version gets ``owners`` filled from its leases
and holds in the same transaction (the schema version stays 1: an earlier
version keeps working on the store).

Every write runs in a ``BEGIN IMMEDIATE`` transaction, so writers of all
processes are serialized by SQLite's own locks, which the kernel releases
when a process dies (even by SIGKILL).
"""

from __future__ import annotations

import sqlite3

__all__ = ["SCHEMA_VERSION", "connect", "create_schema"]

SCHEMA_VERSION = 1
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
    PRIMARY KEY (cid, lid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS holds(
    id INTEGER PRIMARY KEY,
    cid TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_cid ON holds(cid);
CREATE TABLE IF NOT EXISTS processes(
    pid INTEGER PRIMARY KEY,
    start REAL NOT NULL,
    seen REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS leases_unretain AFTER INSERT ON leases BEGIN
    UPDATE content SET retained = NULL WHERE cid = NEW.cid AND retained IS NOT NULL;
END;
CREATE TABLE IF NOT EXISTS owners(
    pid INTEGER NOT NULL,
    start REAL NOT NULL,
    PRIMARY KEY (pid, start)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS leases_owner_insert AFTER INSERT ON leases
WHEN NEW.detached = 0 BEGIN
    INSERT OR IGNORE INTO owners(pid, start) VALUES (NEW.pid, NEW.start);
END;
CREATE TRIGGER IF NOT EXISTS leases_owner_update AFTER UPDATE OF pid, start, detached ON leases
WHEN NEW.detached = 0 BEGIN
    INSERT OR IGNORE INTO owners(pid, start) VALUES (NEW.pid, NEW.start);
END;
CREATE TRIGGER IF NOT EXISTS holds_owner_insert AFTER INSERT ON holds BEGIN
    INSERT OR IGNORE INTO owners(pid, start) VALUES (NEW.pid, NEW.start);
END;
DROP INDEX IF EXISTS leases_owner;
DROP INDEX IF EXISTS holds_owner;
INSERT OR IGNORE INTO meta(key, value) VALUES ('last_reap', 0.0);
INSERT OR IGNORE INTO meta(key, value) VALUES ('dedup_hits', 0);
"""


def connect(path: str, *, safe: bool, timeout: float = 120.0) -> sqlite3.Connection:
    """Open the index at ``path`` in autocommit mode (transactions are
    explicit), WAL, with ``synchronous=FULL`` when ``safe`` else ``OFF``;
    SQLite waits at most ``timeout`` seconds for another connection's lock."""
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


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run ``script`` statement by statement inside the open transaction
    (``executescript`` would commit it)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            db.execute(pending)
            pending = ""


def create_schema(db: sqlite3.Connection) -> None:
    """Create the tables if they do not exist; refuse a newer schema."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the index has schema version {version}; this blobleases knows "
                f"{SCHEMA_VERSION}: upgrade blobleases"
            )
        had_owners = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'owners'"
        ).fetchone()
        _run_script(db, _SCHEMA)
        if had_owners is None:
            db.execute(
                "INSERT OR IGNORE INTO owners(pid, start) "
                "SELECT DISTINCT pid, start FROM leases WHERE detached = 0 "
                "UNION SELECT DISTINCT pid, start FROM holds"
            )
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
