"""The index SQL that SQLite (DirectoryStorage) and PostgreSQL
(PostgresStorage) run as the same text.

Both indexes have the same ``content``, ``leases`` and ``holds`` tables
(``content``: cid, size, created, last_access, ``retained``: NULL while
referenced, else the content's place in the retention LRU; ``leases``: cid,
lid, expires_at, ...; ``holds``: one row per open reader). The statements
are written with SQLite's placeholders (``?`` positional, ``:name`` named);
:func:`for_postgres` gives psycopg's (``%s``, ``%(name)s``).

A lease is *held* while its ``expires_at`` is NULL or after ``:now``;
content is *referenced* while it has a held lease or a reader hold.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "CONTENT",
    "DELETE_UNREFERENCED",
    "EVICTABLE_IN_ORDER",
    "REFERENCED",
    "RETAINED_BYTES",
    "RETAINED_IN_ORDER",
    "TOTAL_BYTES",
    "for_postgres",
]

#: (size, retained) of content ``?``; no row if absent.
CONTENT: Final = "SELECT size, retained FROM content WHERE cid = ?"
#: Whether content ``:cid`` is referenced at ``:now`` (one boolean).
REFERENCED: Final = (
    "SELECT EXISTS(SELECT 1 FROM leases WHERE cid = :cid "
    "AND (expires_at IS NULL OR expires_at > :now)) "
    "OR EXISTS(SELECT 1 FROM holds WHERE cid = :cid)"
)
#: Deletes content ``:cid`` if it is unreferenced at ``:now`` and not
#: retained; returns its size (no row if it stays).
DELETE_UNREFERENCED: Final = (
    "DELETE FROM content WHERE cid = :cid AND retained IS NULL "
    "AND NOT EXISTS(SELECT 1 FROM leases WHERE cid = :cid "
    "AND (expires_at IS NULL OR expires_at > :now)) "
    "AND NOT EXISTS(SELECT 1 FROM holds WHERE cid = :cid) RETURNING size"
)
#: Retained content (cid, size), least recently retained first.
RETAINED_IN_ORDER: Final = (
    "SELECT cid, size FROM content WHERE retained IS NOT NULL ORDER BY retained"
)
#: Content that is not retained and has no reader (cid, size), least
#: recently used first: what ``on_full="evict"`` may evict after the
#: retained content.
EVICTABLE_IN_ORDER: Final = (
    "SELECT cid, size FROM content c WHERE retained IS NULL AND NOT EXISTS "
    "(SELECT 1 FROM holds h WHERE h.cid = c.cid) ORDER BY last_access, cid"
)
#: The total size of retained content.
RETAINED_BYTES: Final = "SELECT coalesce(sum(size), 0) FROM content WHERE retained IS NOT NULL"
#: The total size of present content.
TOTAL_BYTES: Final = "SELECT coalesce(sum(size), 0) FROM content"

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def for_postgres(statement: str) -> str:
    """``statement`` with psycopg's placeholders: ``?`` as ``%s``, ``:name``
    as ``%(name)s`` (a ``::type`` cast is left alone). The statements here
    hold no ``%``, ``?`` or ``:`` in a literal."""
    return _NAMED.sub(r"%(\1)s", statement.replace("?", "%s"))
