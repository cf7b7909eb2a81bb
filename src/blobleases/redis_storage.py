"""RedisStorage: blobs and leases on a Redis server or Redis Cluster, shared by
processes on many hosts.

Layout: the key and field names are those of :mod:`blobleases.redis.keys`
(layout version 2, recorded in the store): per content ``P:{cid}:meta``,
``:leases``, ``:readers``, ``:chunk:<i>`` and ``:staging:<upload>:<i>``, all
with the content id as hash tag so they share one cluster slot; global
bookkeeping under the namespace's own tag ``P:{P}:...`` (index, byte totals,
LRU, retained set, dedup hits, processes, lease expiries); per process
``P:{proc:<owner>}:holds`` and its heartbeat ``P:heartbeat:<owner>``. A store
of another layout is refused with StorageError naming it.

A pid means something only in its pid namespace (containers, ``unshare -p``),
so an owner names its namespace, and "a dead local pid is seen at once"
applies only to owners of this process's own namespace (and only where
``/proc`` shows it); other owners are judged by their heartbeat. Owners of
the older form ``<host id>/<pid>`` (written by blobleases before pid
namespaces were named) keep working, judged by their heartbeat alone.

Every change to one content (store, lease, drop, read hold, delete) is one
Lua script on that content's slot, so it is atomic. Global bookkeeping is
updated by separate single-slot scripts whose updates are idempotent and
ordered so a crash between the two steps can only leave garbage that
:meth:`RedisStorage.collect` repairs, never lose leased content.

The parts live in :mod:`blobleases.redis`: key names (``keys``), the Lua
(``scripts``), heartbeats (``heartbeat``), making room under ``max_bytes``
(``eviction``), chunked range reads (``chunks``), ``collect()`` and
``verify()`` (``repair``), urls and errors (``client``), RESP (``protocol``).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from . import forksafe, policy_rules, rehash
from .content_id import ContentId, new_hasher
from .engine import ReapSchedule
from .errors import ContentNotFound, IntegrityError, StorageError
from .lease_id import LeaseId
from .liveness import (
    can_judge_pids,
    own_start_time,
    pid_namespace,
    process_start_time,
    same_start,
)
from .policies import check_seconds
from .reader import BlobReader, RangeSource
from .redis import chunks, eviction
from .redis import repair as repair_module
from .redis.client import storage_error_context, storage_errors, unsplit
from .redis.heartbeat import Heartbeat, default_host_id, is_dead, vouch
from .redis.keys import (
    LAYOUT_VERSION,
    STAGE_TTL_MS,
    End,
    Keys,
    Meta,
    lease_taken_at,
    lease_value,
    parse_lease_value,
)
from .redis.keys import text as _s
from .redis.protocol import BULK_READ_SIZE, command_packer, connection_class, parser_class
from .redis.scripts import Scripts
from .reports import (
    BlobInfo,
    CollectReport,
    LeaseInfo,
    ReaderInfo,
    StorageStats,
    VerifyReport,
    WhyReport,
)
from .storage import BlobStorage, FileSource, check_hash
from .urls import without_password

__all__ = ["RedisStorage", "default_host_id"]

try:
    import redis
    import redis.cluster
    import redis.exceptions
    import redis.utils
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "RedisStorage needs the redis client: pip install 'blobleases[redis]'"
    ) from _exc

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DEFAULT_NAMESPACE = "blobleases"
_DEFAULT_CHUNK = 4 << 20
_SCAN_COUNT = 1000
_BATCH = 256
_READ_SIZE = 1 << 20
_CLOSE_EXPIRE_BATCHES = 2  # close() ends at most this many batches of expired leases
_DEFAULT_PROTOCOL = int(getattr(redis.utils, "DEFAULT_RESP_VERSION", 2))


class RedisStorage(BlobStorage):
    """Blobs on Redis (``redis://``, ``rediss://``, ``unix://``) or Redis
    Cluster (``redis+cluster://host:port``), shared by processes on many hosts.

    ``namespace`` separates stores on one server; ``chunk_size`` is the size of
    the pieces blobs are stored in (readers fetch only the chunks they read);
    ``heartbeat_ttl`` is how long a process may go silent before other hosts
    reap its leases; ``host_id`` names this machine (default
    :func:`default_host_id`); ``socket_timeout`` bounds every server round
    trip (a server that does not answer gives StorageError). Takes every
    policy of :class:`~blobleases.policies.Policies`; ``max_bytes`` is
    blobleases' own budget, independent of Redis ``maxmemory``.

    Guarantees: a blob becomes visible only when all its chunks are written
    and checked; a failed store leaves nothing visible; leases of a process
    whose heartbeat lapsed (or, on this host, that died) are reaped by any
    client; keys Redis itself lost are detected (IntegrityError, LeaseExpired
    or ContentNotFound), never returned as wrong bytes. A reader reads only
    the blob it opened: every range read checks that blob's upload token with
    its chunks, so when the blob was lost (FLUSHALL, eviction, its hold
    reaped) and the same content stored again, with any chunk size, reads
    raise LeaseExpired. On a server at ``maxmemory`` (noeviction) stores fail
    with StoreFull naming it (new leases with StorageError), while opening,
    reading (readers included), dropping, reaping, ``collect()`` and
    ``verify()`` work and live heartbeats are kept.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = _DEFAULT_NAMESPACE,
        chunk_size: int = _DEFAULT_CHUNK,
        heartbeat_ttl: float = 15.0,
        host_id: str | None = None,
        socket_timeout: float = 10.0,
        **policies: Any,
    ) -> None:
        super().__init__(**policies)
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, not {type(chunk_size).__name__}")
        if not 1024 <= chunk_size <= 256 << 20:
            raise ValueError(f"chunk_size must be between 1 KiB and 256 MiB, not {chunk_size}")
        heartbeat_ttl = check_seconds(heartbeat_ttl, "heartbeat_ttl")
        socket_timeout = check_seconds(socket_timeout, "socket_timeout")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "redis+cluster", "unix"):
            raise ValueError(
                f"url {url!r}: expected redis://, rediss://, unix:// or redis+cluster://"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        for key, text in query:
            if key == "namespace":
                namespace = text
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1-64 letters, digits, '.', '_' or '-', not {namespace!r}"
            )
        host = default_host_id() if host_id is None else host_id
        if not isinstance(host, str) or not _NAME.fullmatch(host):
            raise ValueError(
                f"host_id must be 1-64 letters, digits, '.', '_' or '-', not {host_id!r}"
            )
        self._namespace = namespace
        self._chunk = chunk_size
        self._hb_ttl = float(heartbeat_ttl)
        self.host_id = host
        self._cluster = scheme == "redis+cluster"
        rest = [(k, v) for k, v in query if k != "namespace"]
        own = rest + ([("namespace", namespace)] if namespace != _DEFAULT_NAMESPACE else [])
        self._url = unsplit(parts._replace(query=urlencode(own)))
        client_url = unsplit(
            parts._replace(scheme="redis" if self._cluster else parts.scheme, query=urlencode(rest))
        )
        options: dict[str, Any] = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(socket_timeout),
            # redis-py's parser reads replies in pieces of this size: the 64 KiB
            # default makes a 1 MiB reply about three times slower to read.
            "socket_read_size": _READ_SIZE,
        }
        # Two retries with a short backoff: a dropped connection is renewed at
        # once, and a server that does not answer fails within about three
        # socket timeouts.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        protocol = dict(rest).get("protocol", str(_DEFAULT_PROTOCOL))
        parser = parser_class(int(protocol)) if protocol in ("2", "3") else None
        packer = command_packer()
        if parser is not None and packer is not None:
            # The protocol is named with its parser so the two always agree.
            # Small pieces: this parser receives long replies straight into
            # their buffer.
            options["protocol"] = int(protocol)
            if not self._cluster:
                options["parser_class"] = parser
                options["socket_read_size"] = BULK_READ_SIZE
                options["command_packer"] = packer
            elif "ssl" not in dict(rest) and (bulk_connection := connection_class()) is not None:
                # RedisCluster passes no parser or packer on to its nodes.
                options["connection_class"] = bulk_connection
        try:
            if self._cluster:
                self._r: Any = redis.cluster.RedisCluster.from_url(
                    client_url, retry=retry, **options
                )
            else:
                self._r = redis.Redis.from_url(client_url, retry=retry, **options)
            self._r.ping()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise StorageError(f"cannot reach redis at {self._safe_url()}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ValueError(f"url {self._safe_url()!r}: {exc}") from exc

        self._keys = Keys(namespace)
        self._scripts = Scripts(self._r)
        self._lock = threading.RLock()
        self._reap_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._heartbeat: Heartbeat | None = None
        self._touches: dict[str, float] = {}
        self._active_tokens: set[str] = set()
        self._pending_releases: list[tuple[ContentId, str]] = []
        self._reaps = ReapSchedule(self.policies.reap_interval, time.monotonic())
        self._next_expiry = 0.0  # read the shared expiry index at the first operation
        with storage_error_context(self):
            try:
                self._check_layout()
            except StorageError:
                self._r.close()
                raise
            self._load_all_scripts()
            self._ensure_process()
        forksafe.register(self, lock=_fork_lock, child=_after_fork)
        ref = weakref.ref(self)
        # At exit, after the leases made on this handle (finalizers run
        # newest first) have been dropped.
        weakref.finalize(self, _finish_at_exit, ref)

    def _check_layout(self) -> None:
        """Mark a new store with its key layout (keys.LAYOUT_VERSION); refuse
        a store of another layout, naming both, rather than misread it."""
        found = self._r.get(self._keys.layout)
        if found is None:
            if self._r.exists(*self._keys.old_layout):
                raise StorageError(
                    f"namespace {self._namespace!r} at {self._safe_url()} holds a store of "
                    f"key layout 1 (written by an older blobleases); this blobleases reads "
                    f"layout {LAYOUT_VERSION} only: open it with the blobleases that wrote "
                    f"it, or delete its keys ({self._namespace}:*) or use another namespace"
                )
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                # a server at maxmemory: the next opener marks the new store
                self._r.set(self._keys.layout, LAYOUT_VERSION, nx=True)
                found = self._r.get(self._keys.layout)
        if found is not None and _s(found) != str(LAYOUT_VERSION):
            raise StorageError(
                f"namespace {self._namespace!r} at {self._safe_url()} holds a store of key "
                f"layout {_s(found)}; this blobleases reads layout {LAYOUT_VERSION} only"
            )

    # -- identity --------------------------------------------------------------

    @property
    def url(self) -> str:
        """The url that reopens this store (with ``namespace=`` when not the
        default). A password in the url is kept, so that reopening works;
        ``repr`` hides it."""
        return self._url

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def chunk_size(self) -> int:
        return self._chunk

    def _safe_url(self) -> str:
        return without_password(getattr(self, "_url", ""))

    def __repr__(self) -> str:
        return f"<RedisStorage {self._safe_url()}>"

    # -- keys ------------------------------------------------------------------

    def _base(self, cid: ContentId | str) -> str:
        return self._keys.content(cid)

    def _ckeys(self, cid: ContentId | str) -> list[str]:
        return self._keys.of_content(cid)

    @property
    def _local(self) -> str:
        """This process's host and pid namespace: the part of an owner before
        the pid (pids of other namespaces on this host are other processes)."""
        return f"{self.host_id}.ns{pid_namespace()}"

    def _owner(self, pid: int) -> str:
        return f"{self._local}/{pid}"

    def _proc_key(self, owner: str) -> str:
        return self._keys.holds(owner)

    def _hb_key(self, owner: str) -> str:
        return self._keys.heartbeat(owner)

    # -- scripts -------------------------------------------------------------------

    def _load_all_scripts(self) -> None:
        self._scripts.load_all()

    def _ev(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts.run(name, keys, args)

    def _pipe_ev(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        self._scripts.queue(pipe, name, keys, args)

    def _run_pipe(self, build: Callable[[Any], object]) -> list[Any]:
        return self._scripts.pipeline(build)

    def _each(self, items: list[str], command: Callable[[Any, str], object]) -> list[Any]:
        return self._scripts.each(items, command)

    # -- process liveness ----------------------------------------------------------

    def _ensure_process(self) -> None:
        """Start this process's heartbeat (again, in a forked child)."""
        if self._heartbeat is not None and self._heartbeat.pid == os.getpid():
            return
        with self._lock:
            if self._heartbeat is not None and self._heartbeat.pid == os.getpid():
                return
            self._pid = os.getpid()
            prefix = self._hb_key(self._owner(0))[:-1]
            heartbeat = Heartbeat(self._r, lambda pid: f"{prefix}{pid}", self._hb_ttl)
            self._heartbeat = heartbeat
            # An unclosed storage that is garbage-collected stops its thread.
            weakref.finalize(self, heartbeat.stop.set)

    def _vouch(self, pid: int) -> float:
        """Record a local pid as alive (see heartbeat.vouch)."""
        assert self._heartbeat is not None
        return vouch(self._heartbeat, pid)

    def _is_dead(self, owner: str, start: float, heartbeat: bool) -> bool:
        return is_dead(owner, start, heartbeat, self._local, self._heartbeat)

    # -- maintenance -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the storage is closed")

    def _maintain(self) -> None:
        self._check_open()
        self._ensure_process()
        hb = self._heartbeat
        if hb is not None and hb.missing:
            # Refused at open by a server at maxmemory: beat before this
            # process makes leases that others would otherwise reap.
            hb.beat()
        if self._pending_releases:
            self._retry_releases()
        if time.time() >= self._next_expiry:
            self._expire()
        if self._reaps.due(time.monotonic()) and self._reap_lock.acquire(blocking=False):
            try:
                self._reaps.reaped(time.monotonic())
                self._reap_dead()
                self._flush_touches()
                self._expire()
            finally:
                self._reap_lock.release()

    def _touch(self, cid: ContentId) -> None:
        with self._lock:
            self._touches[str(cid)] = time.time()
            flush = len(self._touches) >= _BATCH
        if flush:
            self._flush_touches()

    def _flush_touches(self) -> None:
        with self._lock:
            touches, self._touches = self._touches, {}
        items = list(touches.items())
        for i in range(0, len(items), _BATCH):
            # A script flagged allow-oom: a full server refuses a plain ZADD.
            args = [x for cid_text, at in items[i : i + _BATCH] for x in (at, cid_text)]
            self._ev("touch", [self._keys.lru], args)

    def _expire(self) -> int:
        """End every lease whose ttl has passed; returns how many."""
        now = time.time()
        due = self._r.zrangebyscore(self._keys.expiries, "-inf", now, start=0, num=_BATCH * 4)
        ended = 0
        for member in due:
            cid_text, lid_text = _s(member).split(" ", 1)
            ended += self._end(cid_text, End.EXPIRE, lid_text)
            self._r.zrem(self._keys.expiries, member)
        first = self._r.zrange(self._keys.expiries, 0, 0, withscores=True)
        self._next_expiry = float(first[0][1]) if first else math.inf
        if len(due) >= _BATCH * 4:
            self._next_expiry = 0.0
        return ended

    def _reap_dead(self) -> tuple[int, int, int]:
        """Reap every known process that is dead; returns (leases, readers,
        processes) ended."""
        procs = {_s(k): _s(v) for k, v in self._r.hgetall(self._keys.processes).items()}
        if not procs:
            return 0, 0, 0
        owners = list(procs)
        alive = self._heartbeats(owners)
        leases = readers = count = 0
        for owner in owners:
            start = float(procs[owner] or 0)
            if not self._is_dead(owner, start, alive[owner]):
                continue
            nl, nr = self._terminate(owner)
            leases += nl
            readers += nr
            count += 1
            self._ev("hdel_if", [self._keys.processes], [owner, procs[owner]])
        return leases, readers, count

    def _heartbeats(self, owners: list[str]) -> dict[str, bool]:
        """Whether each owner's heartbeat key exists."""
        res = self._each(owners, lambda p, o: p.exists(self._hb_key(o)))
        return {o: bool(x) for o, x in zip(owners, res, strict=True)}

    def _terminate(self, owner: str) -> tuple[int, int]:
        """End every non-detached lease and reader hold of ``owner``."""
        key = self._proc_key(owner)
        members = [_s(m) for m in self._r.smembers(key)]
        leases = readers = 0
        for member in members:
            kind, cid_text, ident = member.split(" ", 2)
            mode = End.REAP_LEASE if kind == "lease" else End.REAP_READER
            if self._end(cid_text, mode, ident, owner):
                if kind == "lease":
                    leases += 1
                else:
                    readers += 1
        if members:
            self._r.srem(key, *members)
        host, _, pid_text = owner.rpartition("/")
        if host == self._local and self._heartbeat is not None:
            pid = int(pid_text)
            self._heartbeat.disown(pid)
            if pid != os.getpid():
                self._r.delete(self._hb_key(owner))
        return leases, readers

    def _retry_releases(self) -> None:
        with self._lock:
            pending, self._pending_releases = self._pending_releases, []
        for i, (cid, hold_id) in enumerate(pending):
            try:
                self._release_reader(cid, hold_id)
            except redis.exceptions.RedisError:
                with self._lock:
                    self._pending_releases.extend(pending[i:])
                raise

    # -- content lifecycle -----------------------------------------------------------

    def _end(self, cid_text: str, mode: str, ident: str, owner: str = "") -> int:
        """End one lease or reader hold (see the end script); unreferenced
        content is deleted or retained. Returns 1 if something ended."""
        res = self._ev(
            "end", self._end_keys(cid_text), self._end_args(cid_text, mode, ident, owner)
        )
        self._ended(cid_text, res)
        return int(res[0])

    def _end_keys(self, cid_text: str) -> list[str]:
        """The end script's keys: with the index keys on a standalone server
        (no slots), so a deleted content is unindexed in the same script."""
        keys = self._ckeys(cid_text)
        return keys if self._cluster else keys + self._keys.index_keys()

    def _end_args(self, cid_text: str, mode: str, ident: str, owner: str) -> list[Any]:
        return [
            mode,
            ident,
            owner,
            time.time(),
            self._base(cid_text),
            self.policies.retain_bytes,
            cid_text,
        ]

    def _ended(self, cid_text: str, res: list[Any]) -> None:
        """Finish what the end (or read) script started: remove the index entry
        of content it deleted, retain content it left unreferenced."""
        state = int(res[1])
        if state == 2:
            self._ev("idx_remove", self._keys.index_keys(), [cid_text, _s(res[3])])
        elif state == 1:
            self._unreferenced(ContentId.parse(cid_text), int(res[2]))

    def _unreferenced(self, cid: ContentId, size: int) -> None:
        """Content just lost its last lease and reader: retain or delete it."""
        if policy_rules.retains(size, self.policies.retain_bytes):
            victims = self._ev(
                "retain",
                self._keys.retention(),
                [str(cid), time.time(), size, self.policies.retain_bytes],
            )
            for victim in victims:
                self._delete(_s(victim), "unreferenced")
        else:
            self._delete(str(cid), "unreferenced")

    def _delete(self, cid_text: str, mode: str, token: str = "", *, claim: str = "") -> int:
        """Delete one content per ``mode`` (see the delete script) and its index
        entry; returns the bytes freed (0 if it was kept)."""
        res = self._ev(
            "delete",
            self._ckeys(cid_text),
            [self._base(cid_text), mode, time.time(), token, claim],
        )
        if not int(res[0]):
            return 0
        self._ev("idx_remove", self._keys.index_keys(), [cid_text, _s(res[2])])
        return int(res[1])

    def _intent(
        self, pipe: Any, cid: ContentId, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> str:
        """Queue the bookkeeping written before a lease exists, so that a crash
        right after leaves the lease findable by reaping; returns its owner."""
        owner = self._owner(lid.pid)
        if not detached:
            start = self._vouch(lid.pid)
            pipe.hsetnx(self._keys.processes, owner, repr(start))
            pipe.sadd(self._proc_key(owner), f"lease {cid} {lid}")
        if expires_at is not None:
            pipe.zadd(self._keys.expiries, {f"{cid} {lid}": expires_at})
        return owner

    def _undo_intent(
        self, cid: ContentId, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            pipe = self._r.pipeline(transaction=False)
            if not detached:
                pipe.srem(self._proc_key(self._owner(lid.pid)), f"lease {cid} {lid}")
            if expires_at is not None:
                pipe.zrem(self._keys.expiries, f"{cid} {lid}")
            pipe.execute()

    def _note_expiry(self, expires_at: float | None) -> None:
        if expires_at is not None:
            with self._lock:
                self._next_expiry = min(self._next_expiry, expires_at)

    def _hold(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> tuple[int, int]:
        """Hold the lease if the content is present: (status, size) with status
        0 absent, 1 already held, 2 newly held (a retained blob is referenced again)."""
        expires_at = policy_rules.expires_at(ttl, time.time())
        owner = self._owner(lid.pid)
        value = lease_value(expires_at, detached, owner, time.time())
        keys = self._ckeys(cid)

        def build(pipe: Any) -> None:
            self._intent(pipe, cid, lid, expires_at, detached)
            self._pipe_ev(pipe, "hold", keys[:2], [str(lid), value, time.time()])

        try:
            res = eviction.run_past_eviction(self, cid, build, -1)[-1]
        except StorageError:  # waited too long for an eviction: no lease
            self._undo_intent(cid, lid, expires_at, detached)
            raise
        status, size, was_unref = (int(x) for x in res[:3])
        if status == 0:
            self._undo_intent(cid, lid, expires_at, detached)
        elif status == 2:
            self._note_expiry(expires_at)
            self._touch(cid)
            if was_unref:
                self._ev("unretain", self._keys.retention(), [str(cid)])
        return status, size

    def _count_dedup(self) -> None:
        self._r.incr(self._keys.dedup_hits)
        self._note("dedup_hits")

    def _make_room(self, cid: ContentId, size: int, token: str) -> bool:
        return eviction.make_room(self, cid, size, token)

    def _plan_eviction(self, need: int) -> list[tuple[str, str]] | None:
        return eviction.plan(self, need)

    # -- the backend methods ---------------------------------------------------------

    @storage_errors
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
        if size <= self._chunk and (hashed or cid.matches(data)):
            # One round trip: the commit script holds the lease instead when
            # the content is present (a dedup hit costs the bytes' transfer).
            self._upload(cid, lid, ttl, detached, size, chunks.memory_chunks(data, self._chunk))
            return
        status, _ = self._hold(cid, lid, ttl, detached)
        if status == 2:
            self._count_dedup()
        if status:
            return
        if not hashed:
            check_hash(cid, data)
        self._upload(cid, lid, ttl, detached, size, chunks.memory_chunks(data, self._chunk))

    def _upload(
        self,
        cid: ContentId,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        size: int,
        chunks: Iterator[Any],
        check: Callable[[], None] | None = None,
    ) -> None:
        """Write ``chunks`` to staging keys, then commit them with the lease in
        one script. On any failure nothing becomes visible and the staging
        keys, reservation and lease bookkeeping are removed (best effort; the
        staging keys also expire, and collect() removes what is left)."""
        token = f"{self._owner(os.getpid())}/{uuid.uuid4().hex[:16]}"
        base = self._base(cid)
        prefix = self._keys.staging(cid, token)
        n = -(-size // self._chunk) if size else 0
        expires_at = policy_rules.expires_at(ttl, time.time())
        owner = self._owner(lid.pid)
        with self._lock:
            self._active_tokens.add(token)
        reserved = committed = indexed = False
        written = 0
        try:
            reserved = self._make_room(cid, size, token)
            last: Any = None
            for i, chunk in enumerate(chunks):
                if i == n - 1:
                    last = chunk  # sent with the commit
                    break
                self._r.set(prefix + str(i), chunk, px=STAGE_TTL_MS)
                written = i + 1
            if check is not None:
                check()
            keys = self._ckeys(cid)

            def build(pipe: Any) -> None:
                now = time.time()
                if last is not None:
                    pipe.set(prefix + str(n - 1), last, px=STAGE_TTL_MS)
                self._intent(pipe, cid, lid, expires_at, detached)
                value = lease_value(expires_at, detached, owner, now)
                self._pipe_ev(
                    pipe,
                    "commit",
                    keys[:2],
                    [base, token, n, size, self._chunk, now, str(lid), value],
                )
                # Sent with the commit to save a round trip; corrected below
                # when the commit found the content present.
                self._pipe_ev(
                    pipe, "idx_commit", self._keys.index_keys()[:4], [str(cid), size, token, now]
                )

            indexed = True
            written = n
            res = eviction.run_past_eviction(self, cid, build, -2)[-2]
            reserved = False
            status = int(res[0])
            if status == -1:
                raise IntegrityError(
                    f"chunk {int(res[1])} of {cid} was lost by the server before commit"
                )
            committed = True
            self._note_expiry(expires_at)
            # The blob and lease are committed: the bookkeeping below is
            # idempotent and, if it fails, repaired by collect().
            with contextlib.suppress(redis.exceptions.RedisError):
                if status in (1, 2):
                    self._ev(
                        "idx_commit",
                        self._keys.index_keys()[:4],
                        [str(cid), size, _s(res[3]), time.time()],
                    )
                if status == 2:
                    self._count_dedup()
                    if int(res[2]):
                        self._ev("unretain", self._keys.retention(), [str(cid)])
                self._touch(cid)
                if self.policies.durability == "safe":
                    self._wait_durable()
        except BaseException:
            if committed:
                raise
            with contextlib.suppress(redis.exceptions.RedisError):
                if written:
                    self._r.delete(*[prefix + str(i) for i in range(written)])
            self._undo_intent(cid, lid, expires_at, detached)
            raise
        finally:
            with self._lock:
                self._active_tokens.discard(token)
            if (reserved or indexed) and not committed:
                with contextlib.suppress(redis.exceptions.RedisError):
                    self._ev("idx_remove", self._keys.index_keys(), [str(cid), token])

    def _wait_durable(self) -> None:
        """With durability="safe", wait until the server has fsynced its AOF
        (WAITAOF, Redis >= 7.2); servers without it or without an AOF keep
        their own persistence settings."""
        with contextlib.suppress(redis.exceptions.ResponseError):
            self._r.execute_command("WAITAOF", 1, 0, 0)

    @storage_errors
    def _store_file(
        self, source: FileSource, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        self._maintain()
        # the content id must be known before the first chunk is written
        # (chunks live in its hash slot)
        with rehash.seekable_source(source) as f:
            return self._store_stream(f, lid, algorithm, ttl, detached)

    def _store_stream(
        self, f: IO[bytes], lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        """Hash a seekable file from its position (first pass), then, unless
        the content is present, upload it chunk by chunk while hashing again
        (second pass); a file that changed in between raises IntegrityError."""
        start, cid, size = rehash.identify(f, algorithm)
        status, _ = self._hold(cid, lid, ttl, detached)
        if status == 2:
            self._count_dedup()
        if status:
            return cid, size
        again = rehash.Reread(f, start, size, cid, self._chunk)
        self._upload(cid, lid, ttl, detached, size, iter(again), again.check)
        return cid, size

    @storage_errors
    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        self._maintain()
        status, size = self._hold(cid, lid, ttl, detached)
        if status == 0:
            raise ContentNotFound(cid)
        return size

    @storage_errors
    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        self._maintain()
        value = lease_value(None, False, self._owner(new.pid), time.time())
        keys = self._ckeys(cid)

        def build(pipe: Any) -> None:
            self._intent(pipe, cid, new, None, False)
            self._pipe_ev(pipe, "take_over", keys, [str(old), str(new), value, time.time()])

        try:
            res = eviction.run_past_eviction(self, cid, build, -1)[-1]
        except StorageError:  # waited too long for an eviction: no lease
            self._undo_intent(cid, new, None, False)
            raise
        status, size, was_unref, ended = (int(x) for x in res[:4])
        if status == 0:
            self._undo_intent(cid, new, None, False)
            return None
        if status == 2:
            self._touch(cid)
            if was_unref:
                self._ev("unretain", self._keys.retention(), [str(cid)])
        if ended:
            # the old lease's bookkeeping (a stale entry would be harmless)
            with contextlib.suppress(redis.exceptions.RedisError):
                pipe = self._r.pipeline(transaction=False)
                pipe.srem(self._proc_key(self._owner(old.pid)), f"lease {cid} {old}")
                pipe.zrem(self._keys.expiries, f"{cid} {old}")
                pipe.execute()
        return size

    def _open(
        self, cid: ContentId, lid: LeaseId, hold_id: str, *, with_first_chunk: bool = False
    ) -> tuple[list[Any], Any]:
        """Check the lease (and record a reader hold): the read script's answer
        and, ``with_first_chunk``, the blob's first chunk fetched alongside."""
        keys = self._ckeys(cid)
        owner = self._owner(os.getpid())

        def build(pipe: Any) -> None:
            args = [
                self._base(cid),
                str(lid),
                time.time(),
                hold_id,
                owner,
                self._chunk,
                self.policies.retain_bytes,
            ]
            if hold_id:
                # By scripts flagged allow-oom (as is read): readers open on a
                # server at maxmemory too.
                self._pipe_ev(
                    pipe, "note", [self._keys.processes], ["process", owner, repr(own_start_time())]
                )
                self._pipe_ev(
                    pipe, "note", [self._proc_key(owner)], ["hold", f"reader {cid} {hold_id}"]
                )
            self._pipe_ev(pipe, "read", keys, args)
            if with_first_chunk:
                pipe.get(self._keys.chunk(cid, 0))

        try:
            replies = eviction.run_past_eviction(self, cid, build, -2 if with_first_chunk else -1)
        except StorageError:  # waited too long for an eviction: no hold
            if hold_id:
                with contextlib.suppress(redis.exceptions.RedisError):
                    self._r.srem(self._proc_key(owner), f"reader {cid} {hold_id}")
            raise
        first = replies[-1] if with_first_chunk else None
        res = list(replies[-2] if with_first_chunk else replies[-1])
        status = int(res[0])
        if status == 1:
            self._touch(cid)
            return res, first
        if hold_id:
            with contextlib.suppress(redis.exceptions.RedisError):
                self._r.srem(self._proc_key(self._owner(os.getpid())), f"reader {cid} {hold_id}")
        if status == -1:
            self._ended(str(cid), res)
        raise self._lease_expired(cid, lid)

    @storage_errors
    def _get_data(self, cid: ContentId, lid: LeaseId) -> bytes:
        self._maintain()
        res, first = self._open(cid, lid, "", with_first_chunk=True)
        size, n, cs = int(res[1]), int(res[2]), int(res[3])
        # The first chunk was fetched with the lease check (not atomically:
        # the first chunk of every layout of this content starts with the same
        # bytes, and one of another chunk size has another length).
        want = min(cs, size)
        if first is None or len(first) != want:
            if size:
                chunks.chunk_lost(self._r, self._keys, cid, _s(res[4]), 0)
            first = b""
        parts = [first]
        if n > 1:
            parts += chunks.fetch_parts(
                self._r, self._keys, cid, _s(res[4]), cs, size, cs, size - cs
            )
        data = chunks.joined(parts)
        if len(data) != size:
            raise IntegrityError(f"{cid} has {len(data)} bytes stored, not {size}")
        if self.policies.verify_reads:
            check_hash(cid, data)
        return data

    @storage_errors
    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        self._maintain()
        hold_id = uuid.uuid4().hex
        res, _ = self._open(cid, lid, hold_id)
        size, cs, token = int(res[1]), int(res[3]), _s(res[4])
        try:
            if self.policies.verify_reads:
                hasher = new_hasher(cid.algorithm)
                for off in range(0, size, cs):
                    for part in chunks.fetch_parts(
                        self._r, self._keys, cid, token, cs, size, off, cs
                    ):
                        hasher.update(part)
                if hasher.digest() != cid.digest:
                    raise IntegrityError(f"data does not hash to {cid}")
        except BaseException:
            self._release_reader(cid, hold_id)
            raise
        pid = os.getpid()
        ref = weakref.ref(self)

        @storage_errors
        def fetch(offset: int, length: int) -> bytes:
            storage = ref()
            if storage is None or storage._closed:
                raise StorageError("the storage is closed")
            parts = chunks.fetch_parts(
                storage._r, storage._keys, cid, token, cs, size, offset, length
            )
            return chunks.joined(parts)

        def release() -> None:
            storage = ref()
            if storage is None or storage._closed or os.getpid() != pid:
                return
            try:
                storage._release_reader(cid, hold_id)
            except redis.exceptions.RedisError:
                with storage._lock:
                    storage._pending_releases.append((cid, hold_id))

        return BlobReader(RangeSource(fetch), size, release)

    def _release_reader(self, cid: ContentId, hold_id: str) -> None:
        key = self._proc_key(self._owner(os.getpid()))
        cid_text = str(cid)

        def build(pipe: Any) -> None:
            self._pipe_ev(
                pipe,
                "end",
                self._end_keys(cid_text),
                self._end_args(cid_text, End.RELEASE, hold_id, ""),
            )
            pipe.srem(key, f"reader {cid} {hold_id}")

        self._ended(cid_text, self._run_pipe(build)[0])

    @storage_errors
    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        self._maintain()
        cid_text = str(cid)
        member = f"lease {cid} {lid}"

        def build(pipe: Any) -> None:
            self._pipe_ev(
                pipe,
                "end",
                self._end_keys(cid_text),
                self._end_args(cid_text, End.DROP, str(lid), ""),
            )
            # Dropping a lease that is not held leaves no bookkeeping to remove,
            # so these are harmless either way.
            pipe.srem(self._proc_key(self._owner(lid.pid)), member)
            pipe.zrem(self._keys.expiries, f"{cid} {lid}")

        self._ended(cid_text, self._run_pipe(build)[0])

    @storage_errors
    def _advise_of_pid(self, pid: int) -> None:
        self._maintain()
        if not can_judge_pids():
            return  # /proc shows another pid namespace: its start time is unknowable
        start = process_start_time(pid)
        if start is None:
            return
        owner = self._owner(pid)
        known = self._r.hget(self._keys.processes, owner)
        if known is not None and not same_start(float(_s(known)), start):  # the pid was reused
            self._terminate(owner)
            self._r.hdel(self._keys.processes, owner)
        self._vouch(pid)
        self._r.hset(self._keys.processes, owner, repr(start))

    @storage_errors
    def _advise_pid_terminated(self, pid: int) -> None:
        self._maintain()
        owner = self._owner(pid)
        self._terminate(owner)
        self._r.hdel(self._keys.processes, owner)

    @storage_errors
    def _contains(self, cid: ContentId) -> bool:
        self._maintain()
        return bool(self._r.exists(self._keys.meta(cid)))

    @storage_errors
    def _stat(self, cid: ContentId) -> BlobInfo:
        self._maintain()
        keys = self._ckeys(cid)
        meta, leases, readers = self._run_pipe(
            lambda p: [
                p.hmget(keys[0], Meta.SIZE, Meta.CREATED, Meta.LAST_ACCESS),
                p.hvals(keys[1]),
                p.hlen(keys[2]),
            ]
        )
        if meta[0] is None:
            raise ContentNotFound(cid)
        now = time.time()
        live = 0
        for value in leases:
            exp, _, _ = parse_lease_value(value)
            if exp is None or exp > now:
                live += 1
        return BlobInfo(cid, int(meta[0]), live, int(readers), float(meta[1]), float(meta[2]))

    def _present(self) -> list[str]:
        """Content ids in the LRU index whose meta exists."""
        cids = [_s(c) for c in self._r.zrange(self._keys.lru, 0, -1)]
        found = self._each(cids, lambda p, c: p.exists(self._keys.meta(c)))
        return [c for c, x in zip(cids, found, strict=True) if x]

    @storage_errors
    def _iter_content(self) -> list[ContentId]:
        self._maintain()
        return [ContentId.parse(c) for c in self._present()]

    def _all_leases(self, cids: list[str]) -> Iterator[tuple[str, str, Any, dict[Any, Any]]]:
        """(content id, lease id, lease value, readers) for every content."""
        for i in range(0, len(cids), _BATCH):
            batch = cids[i : i + _BATCH]

            def build(p: Any, b: list[str] = batch) -> None:
                for c in b:
                    p.hgetall(self._base(c) + "leases")
                    p.hgetall(self._base(c) + "readers")

            res = self._run_pipe(build)
            for k, c in enumerate(batch):
                leases, readers = res[2 * k], res[2 * k + 1]
                if not leases:
                    yield c, "", None, readers
                for lid, value in leases.items():
                    yield c, _s(lid), value, readers

    @storage_errors
    def _iter_leases(self) -> list[LeaseInfo]:
        self._maintain()
        now = time.time()
        out: list[LeaseInfo] = []
        for cid_text, lid_text, value, _ in self._all_leases(self._present()):
            if value is None:
                continue
            exp, detached, _owner = parse_lease_value(value)
            if exp is not None and exp <= now:
                continue
            lid = LeaseId.parse(lid_text)
            out.append(LeaseInfo(lid, ContentId.parse(cid_text), lid.pid, exp, detached))
        return out

    @storage_errors
    def _why(self, cid: ContentId) -> WhyReport:
        """Leases (with when they were taken; None for leases stored before
        that was recorded) and reader holds, with the host (``<host id>.ns<pid
        namespace>``) of their owner."""
        self._maintain()
        keys = self._ckeys(cid)
        meta, leases, holds, rank = self._run_pipe(
            lambda p: [
                p.hmget(keys[0], Meta.SIZE, Meta.CREATED, Meta.LAST_ACCESS),
                p.hgetall(keys[1]),
                p.hvals(keys[2]),
                p.zscore(self._keys.retained, str(cid)),
            ]
        )
        if meta[0] is None:
            raise ContentNotFound(cid)
        now = time.time()
        infos = []
        for lid_text, value in leases.items():
            exp, detached, owner = parse_lease_value(value)
            if exp is not None and exp <= now:
                continue
            lid = LeaseId.parse(_s(lid_text))
            host = owner.rpartition("/")[0]
            infos.append(
                LeaseInfo(
                    lid,
                    cid,
                    lid.pid,
                    exp,
                    detached,
                    lease_taken_at(value),
                    host,
                    host == self._local,
                )
            )
        infos.sort(key=lambda i: str(i.lease_id))
        readers = []
        for owner, count in sorted(collections.Counter(_s(v) for v in holds).items()):
            host, _, pid_text = owner.rpartition("/")
            pid = int(pid_text) if pid_text.isdigit() else None
            readers.append(ReaderInfo(pid, count, host, host == self._local))
        info = BlobInfo(cid, int(meta[0]), len(infos), len(holds), float(meta[1]), float(meta[2]))
        return WhyReport(info, tuple(infos), tuple(readers), retained=rank is not None)

    @storage_errors
    def _stats(self) -> StorageStats:
        self._maintain()
        present = self._present()
        now = time.time()
        leases = readers = 0
        owners: set[str] = set()
        seen_readers: set[str] = set()
        for cid_text, _lid, value, holds in self._all_leases(present):
            if cid_text not in seen_readers:
                seen_readers.add(cid_text)
                readers += len(holds)
                owners.update(_s(o) for o in holds.values())
            if value is None:
                continue
            exp, _, _ = parse_lease_value(value)
            if exp is not None and exp <= now:
                continue
            leases += 1
            owners.add(parse_lease_value(value)[2])
        total, reserved, dedup, retb, nret, evicted = self._run_pipe(
            lambda p: [
                p.get(self._keys.total_bytes),
                p.get(self._keys.reserved_bytes),
                p.get(self._keys.dedup_hits),
                p.get(self._keys.retained_bytes),
                p.zcard(self._keys.retained),
                p.hmget(self._keys.evictions, "blobs", "bytes"),
            ]
        )
        return StorageStats(
            blobs=len(present),
            bytes=int(total or 0) - int(reserved or 0),
            leases=leases,
            processes=sum(self._heartbeats(sorted(owners)).values()) if owners else 0,
            dedup_hits=int(dedup or 0),
            readers=readers,
            retained_blobs=int(nret),
            retained_bytes=int(retb or 0),
            evictions=int(evicted[0] or 0),
            evicted_bytes=int(evicted[1] or 0),
        )

    # -- collect and verify (blobleases.redis.repair) ---------------------------------

    @storage_errors
    def _collect(self) -> CollectReport:
        return repair_module.collect(self)

    @storage_errors
    def _verify(self, repair: bool) -> VerifyReport:
        return repair_module.verify(self, repair)

    @storage_errors
    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            hb = self._heartbeat
        self._finish()
        if hb is not None:
            hb.stop.set()
        with contextlib.suppress(Exception):
            self._r.close()

    def _finish(self) -> None:
        """What closing this handle writes, also done at interpreter exit for
        a handle left open: the recorded accesses, and the end of expired
        leases, so content whose leases expired is freed now rather than at
        some client's next operation. Bounded work: at most
        ``_CLOSE_EXPIRE_BATCHES`` batches of expiries, and no expiry round
        trip unless this handle knows of a lease that is due."""
        with contextlib.suppress(Exception):
            self._flush_touches()
        for _ in range(_CLOSE_EXPIRE_BATCHES):
            if self._next_expiry > time.time():
                return
            try:
                self._expire()
            except Exception:
                return

    # -- test support ----------------------------------------------------------

    def _chunk_keys_for_tests(self, cid: ContentId) -> list[str]:
        """The keys of a committed blob's chunks, in order (fault-injection hook)."""
        chunks = self._r.hget(self._keys.meta(cid), Meta.CHUNKS)
        return [self._keys.chunk(cid, i) for i in range(int(chunks))]

    @property
    def client(self) -> Any:
        """The redis-py client (for tests and tools)."""
        return self._r


def _finish_at_exit(ref: weakref.ref[RedisStorage]) -> None:
    """At interpreter exit: :meth:`RedisStorage._finish` on a handle left
    open (a no-op for one closed or garbage-collected before)."""
    storage = ref()
    if storage is not None and not storage._closed:
        storage._finish()


def _fork_lock(storage: RedisStorage) -> threading.RLock:
    return storage._lock


def _after_fork(storage: RedisStorage) -> None:
    """In a forked child (blobleases.forksafe): fresh locks, none of the
    parent's pending work; the client's connection pool makes new
    connections in a new process, and the next operation starts this
    process's own heartbeat."""
    storage._lock = threading.RLock()
    storage._reap_lock = threading.Lock()
    storage._touches = {}
    storage._active_tokens = set()
    storage._pending_releases = []
