"""What a :class:`~blobleases.directory.DirectoryStorage` reports about its
content (``contains``, ``stat``, listings, ``why``, ``stats``) and how it is
kept clean (``collect``, ``verify``, orphaned and dead temporary files)."""

from __future__ import annotations

import contextlib
import math
import os
import time

from ..content_id import ContentId
from ..errors import ContentNotFound
from ..holders import scope_host
from ..lease_id import LeaseId
from ..liveness import can_judge_pids, owner_alive, process_start_time, process_token, same_start
from ..reports import (
    BlobInfo,
    CollectReport,
    LeaseInfo,
    ReaderInfo,
    StorageStats,
    VerifyReport,
    WhyReport,
)
from .index import _SQL_CONTENT, _index_errors
from .layout import _HEX64, _TMP_NAME, _TMP_NAME_V1, _error, _frees
from .leases import _Leases
from .schema import has_lease_created


class _Maintenance(_Leases):
    """Read-only reports, collect and verify."""

    @_index_errors
    def _contains(self, cid: ContentId) -> bool:
        with self._lock:
            db = self._read_op()
            return db.execute(_SQL_CONTENT, (str(cid),)).fetchone() is not None

    @_index_errors
    def _stat(self, cid: ContentId) -> BlobInfo:
        key = str(cid)
        with self._lock:
            db = self._read_op(flush=True)
            now = time.time()
            row = db.execute(
                "SELECT size, created, last_access, "
                "(SELECT count(*) FROM leases WHERE cid = :cid "
                "AND (expires_at IS NULL OR expires_at > :now)), "
                "(SELECT count(*) FROM holds WHERE cid = :cid) "
                "FROM content WHERE cid = :cid",
                {"cid": key, "now": now},
            ).fetchone()
        if row is None:
            raise ContentNotFound(cid)
        size, created, last_access, leases, holds = row
        return BlobInfo(cid, int(size), int(leases), int(holds), created, last_access)

    @_index_errors
    def _iter_content(self) -> list[ContentId]:
        with self._lock:
            db = self._read_op()
            keys = [r[0] for r in db.execute("SELECT cid FROM content")]
        return [ContentId.parse(k) for k in keys]

    @_index_errors
    def _iter_leases(self) -> list[LeaseInfo]:
        with self._lock:
            db = self._read_op()
            rows = db.execute(
                "SELECT lid, cid, expires_at, detached FROM leases "
                "WHERE expires_at IS NULL OR expires_at > ?",
                (time.time(),),
            ).fetchall()
        out = []
        for lkey, key, expires_at, detached in rows:
            lid = LeaseId.parse(lkey)
            out.append(LeaseInfo(lid, ContentId.parse(key), lid.pid, expires_at, bool(detached)))
        return out

    @_index_errors
    def _why(self, cid: ContentId) -> WhyReport:
        """One read transaction: the content row, its unexpired leases (with
        ``created`` where the row has it) and its holds grouped by process;
        host and locality from the scope of each owner."""
        key = str(cid)
        with self._lock:
            db = self._read_op(flush=True)
            now = time.time()
            created = "l.created" if has_lease_created(db) else "NULL"
            began = not db.in_transaction
            if began:
                db.execute("BEGIN")
            try:
                content = db.execute(
                    "SELECT size, created, last_access, retained FROM content WHERE cid = ?",
                    (key,),
                ).fetchone()
                leases = db.execute(
                    f"SELECT l.lid, l.expires_at, l.detached, l.owner, {created}, o.scope "
                    "FROM leases l LEFT JOIN owners o ON o.owner = l.owner WHERE l.cid = ? "
                    "AND (l.expires_at IS NULL OR l.expires_at > ?)",
                    (key, now),
                ).fetchall()
                holds = db.execute(
                    "SELECT h.pid, h.owner, o.scope, count(*) FROM holds h "
                    "LEFT JOIN owners o ON o.owner = h.owner WHERE h.cid = ? "
                    "GROUP BY h.pid, h.owner ORDER BY h.pid",
                    (key,),
                ).fetchall()
            finally:
                if began:
                    db.execute("COMMIT")
        if content is None:
            raise ContentNotFound(cid)
        size, blob_created, last_access, retained = content

        def where(owner: str, scope: str | None) -> tuple[str | None, bool]:
            if scope is None and owner.startswith("pid:"):
                scope = owner.split(":", 3)[3]
            return scope_host(scope, self._scope)

        infos = []
        for lkey, expires_at, detached, owner, lease_created, scope in leases:
            lid = LeaseId.parse(lkey)
            host, local = where(owner, scope)
            infos.append(
                LeaseInfo(lid, cid, lid.pid, expires_at, bool(detached), lease_created, host, local)
            )
        infos.sort(key=lambda i: (i.created_at or math.inf, str(i.lease_id)))
        readers = []
        for pid, owner, scope, count in holds:
            host, local = where(owner, scope)
            readers.append(ReaderInfo(int(pid), int(count), host, local))
        info = BlobInfo(
            cid, int(size), len(infos), sum(r.count for r in readers), blob_created, last_access
        )
        return WhyReport(info, tuple(infos), tuple(readers), retained=retained is not None)

    @_index_errors
    def _stats(self) -> StorageStats:
        with self._lock:
            db = self._read_op()
            now = time.time()
            blobs, total, retained_blobs, retained_bytes = db.execute(
                "SELECT count(*), coalesce(sum(size), 0), count(retained), "
                "coalesce(sum(CASE WHEN retained IS NOT NULL THEN size END), 0) FROM content"
            ).fetchone()
            leases = db.execute(
                "SELECT count(*) FROM leases WHERE expires_at IS NULL OR expires_at > ?", (now,)
            ).fetchone()[0]
            readers = db.execute("SELECT count(*) FROM holds").fetchone()[0]
            owners = db.execute(
                "SELECT owner FROM leases WHERE expires_at IS NULL "
                "OR expires_at > ? UNION SELECT owner FROM holds",
                (now,),
            ).fetchall()
            hits = db.execute("SELECT value FROM meta WHERE key = 'dedup_hits'").fetchone()
            evicted = dict(
                db.execute(
                    "SELECT key, value FROM meta WHERE key IN ('evictions', 'evicted_bytes')"
                ).fetchall()
            )
        # Detached leases of exited processes still count as leases, but only
        # live processes count as processes.
        live = sum(1 for (owner,) in owners if self._owner_seems_alive(owner))
        return StorageStats(
            blobs=int(blobs),
            bytes=int(total),
            leases=int(leases),
            processes=live,
            dedup_hits=int(hits[0]) if hits else 0,
            readers=int(readers),
            retained_blobs=int(retained_blobs),
            retained_bytes=int(retained_bytes),
            evictions=int(evicted.get("evictions", 0)),
            evicted_bytes=int(evicted.get("evicted_bytes", 0)),
        )

    @_frees
    @_index_errors
    def _collect(self) -> CollectReport:
        """In slices (see _maybe_slice); the files of every row are checked
        outside the writer lock and only rows found without their file are
        checked again, and removed, under it."""
        report = CollectReport()
        self._reserve_missing = True  # checked after: another process may have used it
        with self._write(maintain=False, expire=False) as tx:  # _reap expires, counted
            leases, holds, procs = self._reap(tx)
            self._trim_retained(tx, self.policies.retain_bytes)
            report.leases_reaped = leases
            report.readers_reaped = holds
            report.processes_reaped = procs
            report.blobs_deleted = tx.deleted
            report.bytes_freed = tx.freed
        with self._lock:
            keys = [r[0] for r in self._conn().execute("SELECT cid FROM content")]
        missing = [key for key in keys if not self._file_exists(ContentId.parse(key))]
        if missing:
            with self._write(maintain=False, expire=False) as tx:
                for key in missing:
                    cid = ContentId.parse(key)
                    if tx.db.execute(
                        _SQL_CONTENT, (key,)
                    ).fetchone() is not None and not self._file_exists(cid):
                        self._delete(tx, key)
                        tx.deleted -= 1
                        report.rows_removed += 1
                    self._maybe_slice(tx)
                report.blobs_deleted += tx.deleted
                report.bytes_freed += tx.freed
        report.files_removed = len(self._remove_orphans(repair=True))
        try:
            self._remove_dead_owner_files()
        except OSError as exc:
            raise _error(f"cannot list {self._root!r}/owners", exc) from exc
        return report

    def _dead_temp_files(self) -> list[str]:
        """Names in tmp/ whose writer is dead (or that no writer of ours made).
        A writer is its owner token (alive while its lock is held); files of
        writers of schema version 1 are judged by pid and start time, and
        only where this process can judge pids."""
        dead: list[str] = []
        mine = process_token()
        owners: dict[str, bool] = {}
        alive: dict[int, float | None] = {}
        with self._lock:
            tmp = self._dir_fd("tmp", create=False, check=True)
            names = [] if tmp is None else os.listdir(tmp)
        for name in names:
            match = _TMP_NAME.fullmatch(name)
            if match is not None:
                token = match.group(1)
                if token == mine:
                    continue
                if token not in owners:
                    owners[token] = owner_alive(self._owners_fd, token)
                if owners[token]:
                    continue
                dead.append(name)
                continue
            match = _TMP_NAME_V1.fullmatch(name)
            if match is not None:
                if not can_judge_pids():
                    continue
                pid, start = int(match.group(1)), int(match.group(2)) / 1_000_000
                if pid not in alive:
                    alive[pid] = process_start_time(pid)
                current = alive[pid]
                if current is not None and same_start(start, current):
                    continue
            dead.append(name)
        return dead

    def _remove_orphans(self, *, repair: bool) -> list[str]:
        """Blob files that no row names and temporary files of dead writers,
        as paths; removed when ``repair``. Checked under the write lock, so a
        concurrent store's new file is never taken for an orphan."""
        try:
            candidates = self._scan_blob_files()
            temps = self._dead_temp_files()
        except OSError as exc:
            raise _error(f"cannot list the files of {self._root!r}", exc) from exc
        orphans: list[str] = []
        # Files with a row now are not orphans: only the others are checked
        # again, under the write lock (in slices).
        with self._lock:
            known = {r[0] for r in self._conn().execute("SELECT cid FROM content")}
        candidates = [
            (alg, shard, name)
            for alg, shard, name in candidates
            if f"{alg}-{name}" not in known or not _HEX64.fullmatch(name) or name[:2] != shard
        ]
        with self._checking() as (db, tx):
            for alg, shard, name in candidates:
                if tx is not None:
                    self._maybe_slice(tx)
                if _HEX64.fullmatch(name) and name[:2] == shard:
                    key = f"{alg}-{name}"
                    if db.execute("SELECT 1 FROM content WHERE cid = ?", (key,)).fetchone():
                        continue
                path = os.path.join(self._root, "blobs", alg, shard, name)
                orphans.append(path)
                if repair:
                    with self._lock:
                        alg_fd = self._dir_fd("blobs/" + alg, create=False)
                        shard_fd = None if alg_fd is None else self._open_dir_at(alg_fd, shard)
                    if shard_fd is None:
                        continue
                    try:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=shard_fd)
                    finally:
                        os.close(shard_fd)
        for name in temps:
            orphans.append(os.path.join(self._root, "tmp", name))
            if repair:
                with contextlib.suppress(FileNotFoundError), self._lock:
                    os.unlink(name, dir_fd=self._tmp_fd)
        return orphans

    @_frees
    @_index_errors
    def _verify(self, repair: bool) -> VerifyReport:
        if repair and self._read_only:
            self._refuse_read_only("repair it (verify without repair)")
        problems = self._index_problems()
        if problems:
            # nothing is repaired through a broken index: every row and file
            # would be judged by what it says
            return VerifyReport(index_errors=problems)
        with self._lock:
            db = self._read_op()
            rows = db.execute("SELECT cid, size FROM content").fetchall()
        report = VerifyReport(checked=len(rows))
        for key, size in rows:
            cid = ContentId.parse(key)
            try:
                intact = self._check_file(cid, int(size)) is not None
            except FileNotFoundError:
                with self._lock:
                    still = self._conn().execute(_SQL_CONTENT, (key,)).fetchone()
                if still is not None:
                    report.missing.append(cid)
                continue
            except OSError as exc:
                raise _error(f"cannot read the file of blob {cid}", exc) from exc
            if not intact:
                report.corrupted.append(cid)
        report.orphaned = self._remove_orphans(repair=repair)
        if repair and report:
            with self._write(maintain=False) as tx:
                for cid in report.corrupted + report.missing:
                    self._delete(tx, str(cid))
                    self._maybe_slice(tx)
            report.repaired = True
        return report
