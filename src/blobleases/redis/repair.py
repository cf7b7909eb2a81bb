"""Repair and verification of a RedisStorage: ``collect()`` and ``verify()``.

What ``collect()`` repairs: it scans the keyspace for every content, ends
expired leases and the leases and reader holds of dead owners found on any
content (even if missing from the per-process sets), finishes the
unreferenced step (retain or delete) of content nobody holds, rebuilds index
entries and byte totals from the metas (adding missing entries, dropping
those of deleted content, and reservations of dead writers), and deletes
staging chunks of dead writers, chunks no meta names, and leases or readers
hashes without a meta (each rechecked atomically in its content's slot, so
content committed meanwhile is kept). ``verify()`` rehashes every blob and
reports corrupted (wrong bytes or size) and missing (no chunk left) blobs
and orphaned keys; ``verify(repair=True)`` deletes them (their leases then
get LeaseExpired).
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from ..content_id import ContentId, new_hasher
from ..reports import CollectReport, VerifyReport
from .keys import End, Meta, parse_lease_value
from .keys import text as _s

if TYPE_CHECKING:
    from ..redis_storage import RedisStorage

__all__ = ["collect", "verify"]

_SCAN_COUNT = 1000
_BATCH = 256


def scan(storage: RedisStorage, pattern: str) -> list[str]:
    return [_s(k) for k in storage._r.scan_iter(match=pattern, count=_SCAN_COUNT)]


def all_metas(storage: RedisStorage) -> dict[str, dict[str, str]]:
    """Every content's meta found by scanning the keyspace (the repair view)."""
    keys = [
        k
        for k in scan(storage, f"{storage._namespace}:{{*}}:meta")
        if not k.startswith(f"{storage._namespace}:{{proc:")
    ]
    out: dict[str, dict[str, str]] = {}
    res = storage._each(keys, lambda p, k: p.hgetall(k))
    for key, meta in zip(keys, res, strict=True):
        if meta:
            cid_text = key[len(storage._namespace) + 2 : -len("}:meta")]
            out[cid_text] = {_s(k): _s(v) for k, v in meta.items()}
    return out


def writer_dead(storage: RedisStorage, token: str, heartbeats: dict[str, bool]) -> bool:
    """Whether the writer named in an upload token is gone (so its staging
    keys and reservation are leftovers)."""
    host, pid_text = [*token.split("/"), "", ""][:2]
    owner = f"{host}/{pid_text}"
    if host == storage._local and pid_text == str(os.getpid()):
        with storage._lock:
            return token not in storage._active_tokens
    return storage._is_dead(owner, 0.0, heartbeats.get(owner, False))


def collect(storage: RedisStorage) -> CollectReport:
    storage._check_open()
    storage._ensure_process()
    with storage._reap_lock:
        storage._flush_touches()
        before = (
            storage._r.get(storage._keys.total_bytes),
            storage._r.get(storage._keys.reserved_bytes),
        )
        before_blobs = len(storage._present())
        expired = storage._expire()
        leases, readers, procs = storage._reap_dead()
        storage._reaps.reaped(time.monotonic())
        more_leases, more_readers, rows = sweep(storage)
        after_blobs = len(storage._present())
        after = (
            storage._r.get(storage._keys.total_bytes),
            storage._r.get(storage._keys.reserved_bytes),
        )
    freed = (int(before[0] or 0) - int(before[1] or 0)) - (int(after[0] or 0) - int(after[1] or 0))
    return CollectReport(
        leases_reaped=leases + expired + more_leases,
        readers_reaped=readers + more_readers,
        processes_reaped=procs,
        blobs_deleted=max(before_blobs - after_blobs, 0),
        bytes_freed=max(freed, 0),
        rows_removed=rows,
    )


def sweep(storage: RedisStorage) -> tuple[int, int, int]:
    """The repair pass of collect(): every content's leases and holds are
    checked against their owners' liveness (so a crash between a
    content's script and the global bookkeeping cannot leak), unreferenced
    content not retained is deleted, and the global index, staging keys
    and reservations of dead writers are reconciled. Returns (leases,
    readers, index rows and keys removed)."""
    metas = all_metas(storage)
    retained = {_s(c) for c in storage._r.zrange(storage._keys.retained, 0, -1)}
    owners: set[str] = set()
    rows: list[tuple[str, str, Any, dict[Any, Any]]] = list(storage._all_leases(list(metas)))
    for _c, _l, value, holds in rows:
        if value is not None:
            owners.add(parse_lease_value(value)[2])
        owners.update(_s(o) for o in holds.values())
    procs = {_s(k): _s(v) for k, v in storage._r.hgetall(storage._keys.processes).items()}
    owners.update(procs)
    beats = storage._heartbeats(sorted(owners))
    dead = {o for o in owners if storage._is_dead(o, float(procs.get(o) or 0), beats[o])}
    now = time.time()
    leases = readers = removed = 0
    done_readers: set[str] = set()
    for cid_text, lid_text, value, holds in rows:
        if cid_text not in done_readers:
            done_readers.add(cid_text)
            for hold_id, owner in holds.items():
                if _s(owner) in dead:
                    readers += storage._end(cid_text, End.REAP_READER, _s(hold_id), _s(owner))
        if value is None:
            continue
        exp, detached, owner = parse_lease_value(value)
        if exp is not None and exp <= now:
            leases += storage._end(cid_text, End.EXPIRE, lid_text)
        elif owner in dead and not detached:
            leases += storage._end(cid_text, End.REAP_LEASE, lid_text, owner)
    # Content nobody holds that is not in the retained set: finish its
    # unreferenced step (retain or delete).
    for cid_text, meta in metas.items():
        keys = storage._ckeys(cid_text)
        nleases, nreaders = storage._run_pipe(
            lambda p, k=keys: [p.hvals(k[1]), p.hlen(k[2])]  # type: ignore[misc]
        )
        live = [v for v in nleases if (parse_lease_value(v)[0] or math.inf) > now]
        if not live and not int(nreaders) and cid_text not in retained:
            storage._unreferenced(ContentId.parse(cid_text), int(meta.get(Meta.SIZE, 0)))
    # The index: entries whose content is gone, reservations of dead
    # writers; content missing from the index.
    index = {_s(k): _s(v) for k, v in storage._r.hgetall(storage._keys.index).items()}
    metas = all_metas(storage)
    writers = {"/".join(v.split(" ")[1].split("/")[:2]) for v in index.values()}
    beats = storage._heartbeats(sorted(writers | {storage._owner(os.getpid())}))
    for cid_text, value in index.items():
        fields = value.split(" ")
        found = metas.get(cid_text)
        if found is not None and found.get(Meta.UPLOAD) == fields[1]:
            continue
        if found is not None:
            storage._ev(
                "idx_commit",
                storage._keys.index_keys()[:4],
                [cid_text, found.get(Meta.SIZE, 0), found[Meta.UPLOAD], now],
            )
            continue
        # No meta: a leftover, unless its upload is still in flight (on a
        # cluster the index update can land before the commit).
        reservation = len(fields) >= 5 and fields[2] == "reserved"
        expired = reservation and float(fields[3]) <= now
        if not expired and not writer_dead(storage, fields[1], beats):
            continue
        removed += int(storage._ev("idx_remove", storage._keys.index_keys(), [cid_text, fields[1]]))
    for cid_text, meta in metas.items():
        if cid_text not in index:
            storage._ev(
                "idx_commit",
                storage._keys.index_keys()[:4],
                [cid_text, meta.get(Meta.SIZE, 0), meta.get(Meta.UPLOAD, ""), now],
            )
    # Staging chunks of dead writers and chunks no meta names.
    stray = stray_chunks(storage, metas, beats, include_live_staging=False)
    removed += drop_stray(storage, stray)
    storage._ev(
        "retain",
        storage._keys.retention(),
        ["", now, 0, storage.policies.retain_bytes],
    )
    # Leases and reader hashes without a meta.
    removed += drop_stray(storage, orphan_hashes(storage, metas))
    return leases, readers, removed


def stray_chunks(
    storage: RedisStorage,
    metas: dict[str, dict[str, str]],
    beats: dict[str, bool],
    *,
    include_live_staging: bool,
) -> list[str]:
    """Chunk keys that belong to no committed blob: staging of dead writers
    (and of live ones when ``include_live_staging``) and committed-looking
    chunks no meta names."""
    out: list[str] = []
    ns = re.escape(storage._namespace)
    candidates: list[tuple[str, str, int]] = []
    for key in scan(storage, f"{storage._namespace}:{{*}}:chunk:*"):
        m = re.fullmatch(ns + r":\{([^}]*)\}:chunk:(\d+)", key)
        if m is None:
            continue
        meta = metas.get(m.group(1))
        if meta is None or int(m.group(2)) >= int(meta.get(Meta.CHUNKS, 0)):
            candidates.append((key, m.group(1), int(m.group(2))))
    # Content committed since the snapshot is not stray: look again.
    now = current_uploads(storage, sorted({c for _, c, _ in candidates}))
    for key, cid_text, index in candidates:
        current = now.get(cid_text)
        if current is None or index >= int(current[1]):
            out.append(key)
    staged: list[tuple[str, str]] = []
    for key in scan(storage, f"{storage._namespace}:{{*}}:staging:*"):
        m = re.fullmatch(ns + r":\{([^}]*)\}:staging:([^:]+):(\d+)", key)
        if m is not None:
            staged.append((key, m.group(2)))
    writers = {"/".join(token.split("/")[:2]) for _, token in staged}
    missing = sorted(w for w in writers if w not in beats)
    if missing:
        beats = {**beats, **storage._heartbeats(missing)}
    for key, token in staged:
        if include_live_staging or writer_dead(storage, token, beats):
            out.append(key)
    return out


def drop_stray(storage: RedisStorage, keys: list[str]) -> int:
    """Delete content keys that no meta names, rechecking each atomically
    in its content's slot (content committed since the scan is kept)."""
    by_content: dict[str, list[str]] = {}
    pattern = re.compile(re.escape(storage._namespace) + r":\{([^}]*)\}:(.+)")
    for key in keys:
        m = pattern.fullmatch(key)
        if m is not None:
            by_content.setdefault(m.group(1), []).append(m.group(2))
    deleted = 0
    for cid_text, suffixes in by_content.items():
        base = storage._base(cid_text)
        for i in range(0, len(suffixes), _BATCH):
            batch = suffixes[i : i + _BATCH]
            deleted += int(storage._ev("drop_stray", [base + "meta"], [base, *batch]))
    return deleted


def orphan_hashes(storage: RedisStorage, metas: dict[str, dict[str, str]]) -> list[str]:
    """Leases and readers hashes of content that has no meta."""
    candidates: list[tuple[str, str]] = []
    for suffix in ("leases", "readers"):
        for key in scan(storage, f"{storage._namespace}:{{*}}:{suffix}"):
            m = re.fullmatch(re.escape(storage._namespace) + r":\{([^}]*)\}:(leases|readers)", key)
            if m is None or m.group(1).startswith("proc:"):
                continue
            if m.group(1) not in metas:
                candidates.append((key, m.group(1)))
    now = current_uploads(storage, sorted({c for _, c in candidates}))
    return [key for key, cid_text in candidates if cid_text not in now]


def current_uploads(storage: RedisStorage, cids: list[str]) -> dict[str, tuple[str, int]]:
    """(token, chunk count) of those contents that exist now."""
    res = storage._each(cids, lambda p, c: p.hmget(storage._keys.meta(c), Meta.UPLOAD, Meta.CHUNKS))
    return {c: (_s(t), int(n)) for c, (t, n) in zip(cids, res, strict=True) if t is not None}


def verify(storage: RedisStorage, repair: bool) -> VerifyReport:
    storage._maintain()
    metas = all_metas(storage)
    report = VerifyReport(checked=len(metas))
    tokens: dict[ContentId, str] = {}
    for cid_text, meta in sorted(metas.items()):
        cid = ContentId.parse(cid_text)
        size, n, cs = int(meta[Meta.SIZE]), int(meta[Meta.CHUNKS]), int(meta[Meta.CHUNK_SIZE])
        hasher = new_hasher(cid.algorithm)
        prefix = f"{storage._base(cid)}chunk:"
        found = bad = 0
        for i in range(n):
            piece = storage._r.get(prefix + str(i))
            want = cs if i < n - 1 else size - (n - 1) * cs
            if piece is None:
                bad += 1
                continue
            found += 1
            if len(piece) != want:
                bad += 1
            hasher.update(piece)
        broken = bool(n and not found) or bool(bad) or hasher.digest() != cid.digest
        if (
            broken
            and current_uploads(storage, [cid_text]).get(cid_text, ("", 0))[0] != meta[Meta.UPLOAD]
        ):
            continue  # deleted or stored anew while it was being read
        tokens[cid] = meta[Meta.UPLOAD]
        if n and not found:
            report.missing.append(cid)
        elif broken:
            report.corrupted.append(cid)
    beats = storage._heartbeats([storage._owner(os.getpid())])
    stray = stray_chunks(storage, metas, beats, include_live_staging=False)
    orphans = orphan_hashes(storage, metas)
    index = {_s(k): _s(v) for k, v in storage._r.hgetall(storage._keys.index).items()}
    stale = [
        c
        for c, v in index.items()
        if c not in metas and not (len(v.split(" ")) >= 5 and v.split(" ")[2] == "reserved")
    ]
    now = current_uploads(storage, stale)
    stale = [c for c in stale if c not in now]
    report.orphaned.extend(stray + orphans + [f"{storage._keys.index}/{c}" for c in stale])
    if repair and report:
        for cid in report.corrupted + report.missing:
            storage._delete(str(cid), "force", tokens[cid])
        drop_stray(storage, stray + orphans)
        for c in stale:
            storage._ev("idx_remove", storage._keys.index_keys(), [c, ""])
        report.repaired = True
    return report
