"""The names of RedisStorage's keys, hash fields and values: one place.

``P`` is the namespace; ``{cid}`` the content id as a hash tag, so every key
of one content lives in one cluster slot; ``{P}`` the namespace's own tag,
shared by the global bookkeeping. Layout version 2 (:data:`LAYOUT_VERSION`):

Per content (``P:{cid}:...``):

* ``meta``: hash with the fields of :class:`Meta`;
* ``leases``: hash lease id -> lease value (:func:`lease_value`: expiry,
  detached, owner, when taken);
* ``readers``: hash reader hold id -> owner;
* ``chunk:<i>``: the blob's chunks; ``staging:<upload>:<i>``: chunks being
  uploaded (with a TTL), renamed into place by the commit script.

Global (``P:{P}:...``):

* ``layout``: the layout version of the store;
* ``index``: hash content id -> ``"<size> <upload>"``, or for room reserved
  by an upload in progress ``"<size> <upload> reserved <deadline> <owner>"``;
* ``total_bytes`` (committed and reserved), ``reserved_bytes``;
* ``lru``: sorted set content id -> last access;
* ``retained``: sorted set of unreferenced content kept by ``retain_bytes``
  (score: when it became unreferenced), ``retained_sizes`` (hash),
  ``retained_bytes`` (their total);
* ``dedup_hits``; ``evictions`` (hash: blobs, bytes evicted in all); ``processes``: hash owner -> process start time;
  ``expiries``: sorted set ``"<cid> <lease id>"`` -> expires_at.

Per process (owner ``<host id>.ns<pid namespace inode>/<pid>``):
``P:{proc:<owner>}:holds``, a set of ``"lease <cid> <lease id>"`` and
``"reader <cid> <hold id>"`` (what reaping that process ends), and
``P:heartbeat:<owner>`` (a key with a TTL).

The Lua scripts (``scripts.lua``) use these same literal names.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LAYOUT_VERSION",
    "OLD_LAYOUT_KEYS",
    "STAGE_TTL_MS",
    "End",
    "Keys",
    "Meta",
    "lease_taken_at",
    "lease_value",
    "parse_lease_value",
    "text",
]

LAYOUT_VERSION = 2

#: The TTL of staged chunks (an upload that dies leaves none for long).
STAGE_TTL_MS = 3600 * 1000

#: Global keys only layout 1 (blobleases before the layout key) wrote, by
#: their name under ``P:{P}:``.
OLD_LAYOUT_KEYS = ("idx", "bytes", "procs", "dedup", "exp", "ret")


class Meta:
    """Field names of a content's meta hash."""

    SIZE = "size"
    CHUNKS = "chunks"  # the number of chunks
    CHUNK_SIZE = "chunk_size"
    UPLOAD = "upload"  # the upload token of the stored layout
    CREATED = "created"
    LAST_ACCESS = "last_access"
    UNREFERENCED_SINCE = "unreferenced_since"  # '' while referenced
    EVICTING = "evicting"  # "<claim token> <deadline>" while a store evicts it


class End:
    """Modes of the end script: what ends."""

    DROP = "drop"  # a lease, by its id
    REAP_LEASE = "reap_lease"  # a non-detached lease of a dead owner
    EXPIRE = "expire"  # a lease, if its ttl has passed
    RELEASE = "release"  # a reader hold, by its id
    REAP_READER = "reap_reader"  # a reader hold of a dead owner


def text(value: Any) -> str:
    """A reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def lease_value(expires_at: float | None, detached: bool, owner: str, taken_at: float) -> str:
    """A lease's value: ``"<expires_at or empty>|<1 if detached else 0>|<owner>|<taken_at>"``.

    Owners never contain ``|`` (host ids are checked). Values written before
    ``taken_at`` was recorded have only the first three fields."""
    exp = "" if expires_at is None else repr(expires_at)
    return f"{exp}|{'1' if detached else '0'}|{owner}|{taken_at!r}"


def parse_lease_value(value: Any) -> tuple[float | None, bool, str]:
    """(expires_at, detached, owner) of a lease value (of three or four fields)."""
    exp, det, owner = text(value).split("|", 3)[:3]
    return (float(exp) if exp else None), det == "1", owner


def lease_taken_at(value: Any) -> float | None:
    """When the lease was taken, or None for a value written without it."""
    fields = text(value).split("|", 3)
    return float(fields[3]) if len(fields) == 4 and fields[3] else None


class Keys:
    """The key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        g = f"{namespace}:{{{namespace}}}:"
        self.layout = g + "layout"
        self.index = g + "index"
        self.total_bytes = g + "total_bytes"
        self.reserved_bytes = g + "reserved_bytes"
        self.lru = g + "lru"
        self.retained = g + "retained"
        self.retained_sizes = g + "retained_sizes"
        self.retained_bytes = g + "retained_bytes"
        self.dedup_hits = g + "dedup_hits"
        self.evictions = g + "evictions"  # hash: blobs, bytes evicted in all
        self.processes = g + "processes"
        self.expiries = g + "expiries"
        self.old_layout = [g + name for name in OLD_LAYOUT_KEYS]

    def content(self, cid: object) -> str:
        """The prefix of one content's keys (the scripts build chunk keys from it)."""
        return f"{self.namespace}:{{{cid}}}:"

    def meta(self, cid: object) -> str:
        return self.content(cid) + "meta"

    def of_content(self, cid: object) -> list[str]:
        """meta, leases, readers: the keys of the per-content scripts."""
        base = self.content(cid)
        return [base + "meta", base + "leases", base + "readers"]

    def chunk(self, cid: object, index: int) -> str:
        return f"{self.content(cid)}chunk:{index}"

    def staging(self, cid: object, upload: str) -> str:
        """The prefix of an upload's staged chunks (``<prefix><i>``)."""
        return f"{self.content(cid)}staging:{upload}:"

    def retention(self) -> list[str]:
        """retained, retained sizes, retained bytes (the retain scripts' keys)."""
        return [self.retained, self.retained_sizes, self.retained_bytes]

    def index_keys(self) -> list[str]:
        """The keys of idx_remove (idx_commit takes the first four)."""
        return [self.index, self.total_bytes, self.reserved_bytes, self.lru, *self.retention()]

    def holds(self, owner: str) -> str:
        return f"{self.namespace}:{{proc:{owner}}}:holds"

    def heartbeat(self, owner: str) -> str:
        return f"{self.namespace}:heartbeat:{owner}"
