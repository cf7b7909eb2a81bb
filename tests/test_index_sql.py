"""The index SQL shared by SQLite (DirectoryStorage's index) and PostgreSQL
(PostgresStorage) is one text: run on the same rows in both, each statement
gives the same answer."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blobleases import index_sql
from blobleases.directory.schema import create_schema
from blobleases.postgres_storage import PostgresStorage
from pg_servers import PostgresServer

NOW = 100.0
# content: (cid, size, last_access, retained)
CONTENT = [
    ("a", 10, 1.0, 2),  # retained, retained last
    ("b", 20, 2.0, 1),  # retained first
    ("c", 30, 5.0, None),  # leased
    ("d", 40, 3.0, None),  # read (a hold)
    ("e", 50, 4.0, None),  # only an expired lease: unreferenced
    ("f", 60, 4.0, None),  # leased, same last access as e: ordered by cid
]
LEASES = [("c", "l1", None), ("e", "l2", NOW - 1), ("f", "l3", NOW + 1)]
HOLDS = [("d",)]


def test_for_postgres_placeholders() -> None:
    assert index_sql.for_postgres("SELECT ? WHERE a = :cid AND b = :now") == (
        "SELECT %s WHERE a = %(cid)s AND b = %(now)s"
    )
    # a cast is not a placeholder
    assert index_sql.for_postgres("SELECT x::text[] WHERE y = :y") == (
        "SELECT x::text[] WHERE y = %(y)s"
    )


def _fill(run: Callable[[str, tuple[Any, ...]], object]) -> None:
    for cid, size, access, retained in CONTENT:
        run(
            "INSERT INTO content(cid, size, created, last_access, retained) "
            "VALUES (?, ?, ?, ?, ?)",
            (cid, size, 0.0, access, retained),
        )


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    create_schema(db, "test")
    _fill(db.execute)
    for cid, lid, expires in LEASES:
        db.execute(
            "INSERT INTO leases(cid, lid, pid, start, expires_at, detached, owner) "
            "VALUES (?, ?, 1, 0.0, ?, 0, 'o')",
            (cid, lid, expires),
        )
    for (cid,) in HOLDS:
        db.execute("INSERT INTO holds(cid, pid, start, owner) VALUES (?, 1, 0.0, 'o')", (cid,))
    yield db
    db.close()


@pytest.fixture
def pg_conn(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[psycopg.Connection[Any]]:
    namespace = f"q-{uuid.uuid4().hex[:12]}"
    PostgresStorage(postgres_server.dsn, blobs=str(tmp_path / "blobs"), namespace=namespace).close()
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(namespace)))
        _fill(lambda q, p: conn.execute(index_sql.for_postgres(q), p))
        for cid, lid, expires in LEASES:
            conn.execute(
                "INSERT INTO leases(cid, lid, pid, expires_at, detached, owner) "
                "VALUES (%s, %s, 1, %s, false, 'o')",
                (cid, lid, expires),
            )
        for i, (cid,) in enumerate(HOLDS):
            conn.execute("INSERT INTO holds(id, cid, owner) VALUES (%s, %s, 'o')", (str(i), cid))
        yield conn


def _answers(query: Callable[[str, Any], list[tuple[Any, ...]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "retained": query(index_sql.RETAINED_IN_ORDER, ()),
        "evictable": query(index_sql.EVICTABLE_IN_ORDER, ()),
        "retained_bytes": query(index_sql.RETAINED_BYTES, ()),
        "total_bytes": query(index_sql.TOTAL_BYTES, ()),
    }
    for cid, *_ in CONTENT:
        out[f"content {cid}"] = query(index_sql.CONTENT, (cid,))
        out[f"referenced {cid}"] = query(index_sql.REFERENCED, {"cid": cid, "now": NOW})
    for cid, *_ in CONTENT:  # last: it deletes
        out[f"delete {cid}"] = query(index_sql.DELETE_UNREFERENCED, {"cid": cid, "now": NOW})
    out["left"] = query("SELECT cid FROM content ORDER BY cid", ())
    return out


def _normal(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(int(v) if isinstance(v, bool) else v for v in row) for row in rows]


@pytest.mark.postgres
def test_same_text_same_answers(
    sqlite_db: sqlite3.Connection, pg_conn: psycopg.Connection[Any]
) -> None:
    lite = _answers(lambda q, p: _normal(sqlite_db.execute(q, p).fetchall()))
    pg = _answers(lambda q, p: _normal(pg_conn.execute(index_sql.for_postgres(q), p).fetchall()))
    assert lite == pg
    assert lite["retained"] == [("b", 20), ("a", 10)]
    assert [r[0] for r in lite["evictable"]] == ["e", "f", "c"]
    assert lite["referenced e"] == [(0,)] and lite["referenced d"] == [(1,)]
    assert lite["delete e"] == [(50,)] and lite["delete c"] == []
    assert lite["left"] == [("a",), ("b",), ("c",), ("d",), ("f",)]
