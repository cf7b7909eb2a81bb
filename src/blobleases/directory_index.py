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

The owners of leases and holds, ``(pid, start)``, are indexed (leases only
when not detached) so that a reap finds them by index lookups, never by a
scan of every lease. Every object is created ``IF NOT EXISTS`` whenever a
store is opened, so a store made by an earlier version gains the indexes the
first time this version opens it (the schema version stays 1: an earlier
version opening the store keeps working, and SQLite keeps the indexes up to
date for it too).

Every write runs in a ``BEGIN IMMEDIATE`` transaction, so writers of all
processes are serialized by SQLite's own locks, which the kernel releases
when a process dies (even by SIGKILL).
"""

from __future__ import annotations

import sqlite3

__all__ = ["SCHEMA_VERSION", "connect", "create_schema"]

SCHEMA_VERSION = 1

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
CREATE INDEX IF NOT EXISTS leases_owner ON leases(pid, start) WHERE detached = 0;
CREATE TABLE IF NOT EXISTS holds(
    id INTEGER PRIMARY KEY,
    cid TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_cid ON holds(cid);
CREATE INDEX IF NOT EXISTS holds_owner ON holds(pid, start);
CREATE TABLE IF NOT EXISTS processes(
    pid INTEGER PRIMARY KEY,
    start REAL NOT NULL,
    seen REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS leases_unretain AFTER INSERT ON leases BEGIN
    UPDATE content SET retained = NULL WHERE cid = NEW.cid AND retained IS NOT NULL;
END;
INSERT OR IGNORE INTO meta(key, value) VALUES ('last_reap', 0.0);
INSERT OR IGNORE INTO meta(key, value) VALUES ('dedup_hits', 0);
"""


def connect(path: str, *, safe: bool) -> sqlite3.Connection:
    """Open the index at ``path`` in autocommit mode (transactions are
    explicit), WAL, with ``synchronous=FULL`` when ``safe`` else ``OFF``."""
    db = sqlite3.connect(
        path,
        timeout=120.0,
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
        _run_script(db, _SCHEMA)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
