"""RedisStorage: blobs and leases on a Redis server or Redis Cluster, shared by
processes on many hosts.

Layout (``P`` is the namespace, ``{cid}`` the content id as a hash tag, so
every key of one content lives in one cluster slot):

* ``P:{cid}:m`` meta hash (size, chunk count, chunk size, upload token,
  created, last access, unreferenced-since), ``P:{cid}:l`` leases hash
  (lease id -> ``expires|detached|owner``), ``P:{cid}:r`` reader holds
  (hold id -> owner), ``P:{cid}:d:<i>`` the chunks, and
  ``P:{cid}:c:<token>:<i>`` chunks being uploaded (with a TTL), renamed into
  place by the commit script.
* Global bookkeeping under the namespace's own hash tag ``P:{P}:...``: the
  index of content and sizes with the byte total (and reservations of
  uploads in progress), the LRU order, the retained set, dedup hits, known
  processes, lease expiries.
* ``P:{p:<owner>}:h``: what one process (``<host id>.ns<pid namespace
  inode>/<pid>``) holds, so its leases and reader holds can be reaped;
  ``P:hb:<owner>``: its heartbeat.

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

import collections
import contextlib
import functools
import math
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from importlib import resources
from typing import IO, Any, ParamSpec, TypeVar
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from . import ingest, policy_rules
from .content_id import ContentId, new_hasher
from .errors import ContentNotFound, IntegrityError, LeaseExpired, StorageError, StoreFull
from .lease_id import LeaseId
from .liveness import (
    can_judge_pids,
    is_alive,
    own_start_time,
    pid_namespace,
    process_start_time,
    same_start,
)
from .policies import check_seconds
from .reader import BlobReader, RangeSource
from .redis_protocol import BULK_READ_SIZE, command_packer, connection_class, parser_class
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

_P = ParamSpec("_P")
_R = TypeVar("_R")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DEFAULT_NAMESPACE = "blobleases"
_DEFAULT_CHUNK = 4 << 20
_STAGE_TTL_MS = 3600 * 1000
_PIPE_BYTES = 16 << 20  # bytes fetched per pipelined batch of chunk reads
_SCAN_COUNT = 1000
_BATCH = 256
_READ_SIZE = 1 << 20
_CLOSE_EXPIRE_BATCHES = 2  # close() ends at most this many batches of expired leases
_DEFAULT_PROTOCOL = int(getattr(redis.utils, "DEFAULT_RESP_VERSION", 2))


def default_host_id() -> str:
    """A stable id of this machine: its hostname and the start of
    ``/etc/machine-id`` (containers sharing an image keep distinct hostnames)."""
    name = socket.gethostname() or "host"
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                machine = f.read().strip()[:12]
            break
        except OSError:
            continue
    text = f"{name}.{machine}" if machine else name
    text = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64]
    return text or "host"


def _unsplit(parts: SplitResult) -> str:
    """``urlunsplit`` that keeps the ``//`` of a url without a host:
    ``unix:///path`` (urlunsplit gives ``unix:/path``, which redis-py refuses)."""
    text = urlunsplit(parts)
    if (
        not parts.netloc
        and parts.path.startswith("/")
        and not text.startswith(parts.scheme + "://")
    ):
        text = f"{parts.scheme}://{text[len(parts.scheme) + 1 :]}"
    return text


@functools.cache
def _load_scripts() -> dict[str, str]:
    """The scripts of redis_storage.lua by name. A section header may name
    Redis 7 script flags after the name (``--@ end allow-oom``): the script
    then starts with the ``#!lua flags=...`` shebang."""
    text = resources.files("blobleases").joinpath("redis_storage.lua").read_text("utf-8")
    parts = re.split(r"^--@ (\w+)((?: [\w-]+)*)\s*$", text, flags=re.M)
    prelude = parts[0]
    out: dict[str, str] = {}
    for name, flags, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        out[name] = _with_flags(flags.split(), prelude + body)
    return out


def _with_flags(flags: list[str], body: str) -> str:
    return f"#!lua flags={','.join(flags)}\n{body}" if flags else body


def _without_flags(body: str) -> str:
    """A script without its shebang (for servers before Redis 7, which have no
    script flags and let a script run until its first write that needs memory)."""
    return body.split("\n", 1)[1] if body.startswith("#!") else body


@contextlib.contextmanager
def _storage_error_context(storage: Any = None, *, storing: bool = False) -> Iterator[None]:
    """Turn redis-py failures into StorageError, chained; a write refused by a
    server at maxmemory into StoreFull when ``storing``, else StorageError,
    naming the server's maxmemory (read from ``storage``'s server)."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        message = f"the redis server is full ({_memory_limit(storage)}): {exc}"
        if storing:
            raise StoreFull(message) from exc
        raise StorageError(message) from exc
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise StorageError(f"redis: {type(exc).__name__}: {exc}") from exc


def _memory_limit(storage: Any) -> str:
    """``maxmemory`` and ``used_memory`` of the server, as far as it says."""
    client = getattr(storage, "_r", None)
    if client is None:
        return "maxmemory reached"
    try:
        info = client.info("memory")
        if isinstance(info, dict) and "maxmemory" not in info:  # a cluster: one per node
            info = next((v for v in info.values() if isinstance(v, dict)), info)
        return (
            f"maxmemory {int(info['maxmemory'])} bytes, used_memory "
            f"{int(info['used_memory'])} bytes, maxmemory-policy "
            f"{info.get('maxmemory_policy', '?')}"
        )
    except Exception:
        return "maxmemory reached"


def _storage_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``func`` in :func:`_storage_error_context`; a method that stores
    (``_store``, ``_store_file``) gets StoreFull from a full server."""
    storing = func.__name__ in ("_store", "_store_file")

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _storage_error_context(args[0] if args else None, storing=storing):
            return func(*args, **kwargs)

    return wrapper


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _lease_value(expires_at: float | None, detached: bool, owner: str) -> str:
    exp = "" if expires_at is None else repr(expires_at)
    return f"{exp}|{'1' if detached else '0'}|{owner}"


def _parse_lease_value(value: Any) -> tuple[float | None, bool, str]:
    exp, det, owner = _s(value).split("|", 2)
    return (float(exp) if exp else None), det == "1", owner


class _Heartbeat:
    """A daemon thread refreshing this process's heartbeat key (and those of
    local pids this handle vouches for) every ``ttl / 5`` seconds."""

    def __init__(self, client: Any, key_of: Callable[[int], str], ttl: float) -> None:
        self.client = client
        self.key_of = key_of
        self.ttl_ms = max(int(ttl * 1000), 1)
        self.interval = ttl / 5
        self.pid = os.getpid()
        self.start = own_start_time()
        self.adopted: dict[int, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.missing = True
        self.beat()
        self.thread = threading.Thread(target=self._run, name="blobleases-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        """Refresh the heartbeats. A server at maxmemory refuses SET but not
        PEXPIRE, so there the heartbeats that exist are kept alive (and
        ``missing`` says whether this process's own is absent)."""
        with self.lock:
            adopted = list(self.adopted.items())
        pipe = self.client.pipeline(transaction=False)
        keys = [self.key_of(self.pid)]
        pipe.set(keys[0], repr(self.start), px=self.ttl_ms)
        for pid, start in adopted:
            # where /proc shows another pid namespace, a vouched pid cannot be
            # checked: its heartbeat lasts as long as this process's
            if not can_judge_pids() or is_alive(pid, start):
                keys.append(self.key_of(pid))
                pipe.set(keys[-1], repr(start), px=self.ttl_ms)
            else:
                with self.lock:
                    self.adopted.pop(pid, None)
        replies = pipe.execute(raise_on_error=False)
        refused = [
            k
            for k, r in zip(keys, replies, strict=True)
            if isinstance(r, redis.exceptions.OutOfMemoryError)
        ]
        for reply in replies:
            if isinstance(reply, Exception) and not isinstance(
                reply, redis.exceptions.OutOfMemoryError
            ):
                raise reply
        own_missing = False
        if refused:
            pipe = self.client.pipeline(transaction=False)
            for key in refused:
                pipe.pexpire(key, self.ttl_ms)
            kept = pipe.execute()
            own_missing = keys[0] in refused and not kept[0]
        self.missing = own_missing

    def adopt(self, pid: int, start: float) -> None:
        with self.lock:
            self.adopted[pid] = start
        self.client.set(self.key_of(pid), repr(start), px=self.ttl_ms)

    def disown(self, pid: int) -> None:
        with self.lock:
            self.adopted.pop(pid, None)

    def vouches(self, pid: int) -> bool:
        with self.lock:
            return pid == self.pid or pid in self.adopted

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            if os.getpid() != self.pid:
                return
            with contextlib.suppress(Exception):
                self.beat()


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
        self._url = _unsplit(parts._replace(query=urlencode(own)))
        client_url = _unsplit(
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

        p = namespace
        g = f"{p}:{{{p}}}:"
        self._k_idx = g + "idx"
        self._k_bytes = g + "bytes"
        self._k_resb = g + "resb"
        self._k_lru = g + "lru"
        self._k_ret = g + "ret"
        self._k_doom = g + "doom"
        self._k_rsz = g + "rsz"
        self._k_retb = g + "retb"
        self._k_evict = g + "evict"  # evictions: blobs (n) and bytes (b)
        self._k_dedup = g + "dedup"
        self._k_procs = g + "procs"
        self._k_exp = g + "exp"
        self._scripts: dict[str, tuple[str, str]] = {}
        for name, body in _load_scripts().items():
            self._scripts[name] = (body, "")
        self._lock = threading.RLock()
        self._reap_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._heartbeat: _Heartbeat | None = None
        self._touches: dict[str, float] = {}
        self._active_tokens: set[str] = set()
        self._pending_releases: list[tuple[ContentId, str]] = []
        self._next_reap = time.monotonic() + self.policies.reap_interval
        self._next_expiry = 0.0  # read the shared expiry index at the first operation
        with _storage_error_context(self):
            self._load_all_scripts()
            self._ensure_process()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(ref))
        # At exit, after the leases made on this handle (finalizers run
        # newest first) have been dropped.
        weakref.finalize(self, _finish_at_exit, ref)

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
        parts = urlsplit(getattr(self, "_url", ""))
        if parts.password is None:
            return _unsplit(parts)
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return _unsplit(parts._replace(netloc=f"{user}:***@{netloc}"))

    def __repr__(self) -> str:
        return f"<RedisStorage {self._safe_url()}>"

    # -- keys ------------------------------------------------------------------

    def _base(self, cid: ContentId | str) -> str:
        return f"{self._namespace}:{{{cid}}}:"

    def _ckeys(self, cid: ContentId | str) -> list[str]:
        b = self._base(cid)
        return [b + "m", b + "l", b + "r"]

    @property
    def _local(self) -> str:
        """This process's host and pid namespace: the part of an owner before
        the pid (pids of other namespaces on this host are other processes)."""
        return f"{self.host_id}.ns{pid_namespace()}"

    def _owner(self, pid: int) -> str:
        return f"{self._local}/{pid}"

    def _proc_key(self, owner: str) -> str:
        return f"{self._namespace}:{{p:{owner}}}:h"

    def _hb_key(self, owner: str) -> str:
        return f"{self._namespace}:hb:{owner}"

    def _g_idx(self) -> list[str]:
        return [
            self._k_idx,
            self._k_bytes,
            self._k_resb,
            self._k_lru,
            self._k_ret,
            self._k_rsz,
            self._k_retb,
        ]

    # -- scripts -------------------------------------------------------------------

    def _load_all_scripts(self) -> None:
        for name, (body, _) in list(self._scripts.items()):
            try:
                sha = self._r.script_load(body)
            except redis.exceptions.ResponseError:
                if not body.startswith("#!"):
                    raise
                body = _without_flags(body)
                sha = self._r.script_load(body)
            self._scripts[name] = (body, _s(sha))

    def _ev(self, name: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._scripts[name][1]
        try:
            return self._r.evalsha(sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self._load_all_scripts()
            return self._r.evalsha(self._scripts[name][1], len(keys), *keys, *args)

    def _pipe_ev(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        # execute_command: redis-py's cluster pipeline blocks its evalsha method
        # but routes EVALSHA by its keys like any other command.
        pipe.execute_command("EVALSHA", self._scripts[name][1], len(keys), *keys, *args)

    def _run_pipe(self, build: Callable[[Any], object]) -> list[Any]:
        """Run a pipeline built by ``build`` (which must hold only idempotent
        commands); reload the scripts and run it again if the server lost them."""
        for attempt in (0, 1):
            pipe = self._r.pipeline(transaction=False)
            build(pipe)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self._load_all_scripts()
        raise AssertionError("unreachable")  # pragma: no cover

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
            heartbeat = _Heartbeat(self._r, lambda pid: f"{prefix}{pid}", self._hb_ttl)
            self._heartbeat = heartbeat
            # An unclosed storage that is garbage-collected stops its thread.
            weakref.finalize(self, heartbeat.stop.set)

    def _vouch(self, pid: int) -> float:
        """Record a local pid as alive (its heartbeat kept by this handle);
        returns its start time (0.0 if unknown; the pid may be dead)."""
        hb = self._heartbeat
        assert hb is not None
        if pid == os.getpid():
            return own_start_time()
        if not can_judge_pids():
            hb.adopt(pid, 0.0)  # cannot be looked up: vouched for while we live
            return 0.0
        start = process_start_time(pid)
        if start is None:
            return 0.0
        hb.adopt(pid, start)
        return start

    def _is_dead(self, owner: str, start: float, heartbeat: bool) -> bool:
        host, _, pid_text = owner.rpartition("/")
        try:
            pid = int(pid_text)
        except ValueError:
            return True
        if host == self._local:
            if pid == os.getpid():
                return False
            if can_judge_pids() and not is_alive(pid, start or None):
                return True
            hb = self._heartbeat
            if hb is not None and hb.vouches(pid):
                return False
        return not heartbeat

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
        if time.monotonic() >= self._next_reap and self._reap_lock.acquire(blocking=False):
            try:
                self._next_reap = time.monotonic() + self.policies.reap_interval
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
            self._ev("touch", [self._k_lru], args)

    def _expire(self) -> int:
        """End every lease whose ttl has passed; returns how many."""
        now = time.time()
        due = self._r.zrangebyscore(self._k_exp, "-inf", now, start=0, num=_BATCH * 4)
        ended = 0
        for member in due:
            cid_text, lid_text = _s(member).split(" ", 1)
            ended += self._end(cid_text, "LE", lid_text)
            self._r.zrem(self._k_exp, member)
        first = self._r.zrange(self._k_exp, 0, 0, withscores=True)
        self._next_expiry = float(first[0][1]) if first else math.inf
        if len(due) >= _BATCH * 4:
            self._next_expiry = 0.0
        return ended

    def _reap_dead(self) -> tuple[int, int, int]:
        """Reap every known process that is dead; returns (leases, readers,
        processes) ended."""
        procs = {_s(k): _s(v) for k, v in self._r.hgetall(self._k_procs).items()}
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
            self._ev("hdel_if", [self._k_procs], [owner, procs[owner]])
        return leases, readers, count

    def _heartbeats(self, owners: list[str]) -> dict[str, bool]:
        found: dict[str, bool] = {}
        res = self._each(owners, lambda p, o: p.exists(self._hb_key(o)))
        found.update({o: bool(x) for o, x in zip(owners, res, strict=True)})
        return found

    def _terminate(self, owner: str) -> tuple[int, int]:
        """End every non-detached lease and reader hold of ``owner``."""
        key = self._proc_key(owner)
        members = [_s(m) for m in self._r.smembers(key)]
        leases = readers = 0
        for member in members:
            kind, cid_text, ident = member.split(" ", 2)
            if self._end(cid_text, "LO" if kind == "L" else "RO", ident, owner):
                if kind == "L":
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
        return keys if self._cluster else keys + self._g_idx()

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
            self._ev("idx_remove", self._g_idx(), [cid_text, _s(res[3])])
        elif state == 1:
            self._unreferenced(ContentId.parse(cid_text), int(res[2]))

    def _unreferenced(self, cid: ContentId, size: int) -> None:
        """Content just lost its last lease and reader: retain or delete it."""
        if policy_rules.retains(size, self.policies.retain_bytes):
            victims = self._ev(
                "retain",
                [self._k_ret, self._k_rsz, self._k_retb],
                [str(cid), time.time(), size, self.policies.retain_bytes],
            )
            for victim in victims:
                self._delete(_s(victim), "unref")
        else:
            self._delete(str(cid), "unref")

    def _delete(self, cid_text: str, mode: str, token: str = "") -> int:
        """Delete one content per ``mode`` (see the delete script) and its index
        entry; returns the bytes freed (0 if it was kept)."""
        res = self._ev(
            "delete", self._ckeys(cid_text), [self._base(cid_text), mode, time.time(), token]
        )
        if not int(res[0]):
            return 0
        self._ev("idx_remove", self._g_idx(), [cid_text, _s(res[2])])
        return int(res[1])

    def _intent(
        self, pipe: Any, cid: ContentId, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> str:
        """Queue the bookkeeping written before a lease exists, so that a crash
        right after leaves the lease findable by reaping; returns its owner."""
        owner = self._owner(lid.pid)
        if not detached:
            start = self._vouch(lid.pid)
            pipe.hsetnx(self._k_procs, owner, repr(start))
            pipe.sadd(self._proc_key(owner), f"L {cid} {lid}")
        if expires_at is not None:
            pipe.zadd(self._k_exp, {f"{cid} {lid}": expires_at})
        return owner

    def _undo_intent(
        self, cid: ContentId, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            pipe = self._r.pipeline(transaction=False)
            if not detached:
                pipe.srem(self._proc_key(self._owner(lid.pid)), f"L {cid} {lid}")
            if expires_at is not None:
                pipe.zrem(self._k_exp, f"{cid} {lid}")
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
        value = _lease_value(expires_at, detached, owner)
        keys = self._ckeys(cid)

        def build(pipe: Any) -> None:
            self._intent(pipe, cid, lid, expires_at, detached)
            self._pipe_ev(pipe, "hold", keys[:2], [str(lid), value, time.time()])

        status, size, was_unref = (int(x) for x in self._run_pipe(build)[-1][:3])
        if status == 0:
            self._undo_intent(cid, lid, expires_at, detached)
        elif status == 2:
            self._note_expiry(expires_at)
            self._touch(cid)
            if was_unref:
                self._ev("unretain", [self._k_ret, self._k_rsz, self._k_retb], [str(cid)])
        return status, size

    def _count_dedup(self) -> None:
        self._r.incr(self._k_dedup)
        self._note("dedup_hits")

    def _make_room(self, cid: ContentId, size: int, token: str) -> bool:
        """Reserve ``size`` bytes under ``max_bytes`` for an upload, evicting
        per policy; True if reserved (False: the content is indexed already).

        The plan comes first: the victims that suffice are chosen, then one
        script checks that they still free enough and reserves the room while
        claiming them (so a concurrent store cannot count them again); only
        then are they deleted. StoreFull when the victims the policy allows
        cannot free enough, with nothing evicted. (A victim that gains a
        reader or lease between the plan and its deletion is kept; if that
        leaves the store short, the reservation is released and StoreFull
        raised: the only case where a failed store has evicted.)"""
        limit = self.policies.max_bytes
        if limit is None:
            return False
        if size > limit:
            raise StoreFull(policy_rules.too_large_message(size, limit))
        self._flush_touches()
        victims: list[tuple[str, str]] = []
        for _ in range(8):
            res = self._ev(
                "reserve",
                [self._k_idx, self._k_bytes, self._k_resb, self._k_doom],
                [
                    str(cid),
                    size,
                    token,
                    limit,
                    time.time() + _STAGE_TTL_MS / 1000,
                    self._owner(os.getpid()),
                    time.time(),
                    *(victim for victim, _ in victims),
                ],
            )
            status = int(res[0])
            if status in (0, 1):
                break
            if status == 2:
                total = int(res[1])
                planned = self._plan_eviction(total + size - limit)
                if planned is None:
                    raise StoreFull(
                        policy_rules.over_limit_message(size, limit, total, self.policies.on_full)
                    )
                victims = planned
            else:
                victims = []
        else:
            raise StoreFull(f"storing {size} bytes: could not make room under max_bytes={limit}")
        if status == 0:
            return False
        if victims:
            freed = evicted = 0
            try:
                for victim, mode in victims:
                    n = self._delete(victim, mode)
                    freed += n
                    evicted += n > 0
            finally:
                self._r.hdel(self._k_doom, *(victim for victim, _ in victims))
                if evicted:
                    self._run_pipe(
                        lambda p: [
                            p.hincrby(self._k_evict, "n", evicted),
                            p.hincrby(self._k_evict, "b", freed),
                        ]
                    )
                    self._note_evictions(evicted, freed)
            # A victim this store did not delete either was deleted by another
            # (its room is free) or gained a lease or reader (it stays).
            if freed < int(res[1]) and any(
                self._r.hexists(self._k_idx, victim) for victim, _ in victims
            ):
                self._ev("idx_remove", self._g_idx(), [str(cid), token])
                raise StoreFull(
                    f"storing {size} bytes: content chosen for eviction gained a lease or "
                    f"reader meanwhile (max_bytes={limit})"
                )
        return True

    def _plan_eviction(self, need: int) -> list[tuple[str, str]] | None:
        """Victims, with their delete mode, that free at least ``need`` bytes,
        by policy_rules.plan_eviction; None if not enough can be freed.
        Content another store has claimed (doomed) is passed over."""
        now = time.time()
        doomed = {_s(c) for c, t in self._r.hgetall(self._k_doom).items() if float(_s(t)) > now}
        retained = [_s(c) for c in self._r.zrange(self._k_ret, 0, -1)]
        retained_sizes = self._sizes([c for c in retained if c not in doomed])

        def leased() -> Iterator[tuple[str, int, bool]]:
            skip = doomed | set(retained)
            start = 0
            while batch := [_s(c) for c in self._r.zrange(self._k_lru, start, start + _BATCH - 1)]:
                start += _BATCH
                batch = [c for c in batch if c not in skip]
                sizes = self._sizes(batch)
                readers = self._each(batch, lambda p, c: p.hlen(self._base(c) + "r"))
                for cid_text, nreaders in zip(batch, readers, strict=True):
                    if cid_text in sizes:
                        yield cid_text, sizes[cid_text], bool(int(nreaders))

        victims = policy_rules.plan_eviction(
            need, retained_sizes.items(), leased(), self.policies.on_full
        )
        if victims is None:
            return None
        return [(c, "unref" if c in retained_sizes else "evict") for c in victims]

    def _sizes(self, cids: list[str]) -> dict[str, int]:
        if not cids:
            return {}
        values = self._r.hmget(self._k_idx, cids)
        return {c: int(_s(v).split(" ", 1)[0]) for c, v in zip(cids, values, strict=True) if v}

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
        if size <= self._chunk and (hashed or cid.matches(data)):
            # One round trip: the commit script holds the lease instead when
            # the content is present (a dedup hit costs the bytes' transfer).
            self._upload(cid, lid, ttl, detached, size, _memory_chunks(data, self._chunk))
            return
        status, _ = self._hold(cid, lid, ttl, detached)
        if status == 2:
            self._count_dedup()
        if status:
            return
        if not hashed:
            check_hash(cid, data)
        self._upload(cid, lid, ttl, detached, size, _memory_chunks(data, self._chunk))

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
        prefix = f"{base}c:{token}:"
        n = -(-size // self._chunk) if size else 0
        expires_at = policy_rules.expires_at(ttl, time.time())
        owner = self._owner(lid.pid)
        value = _lease_value(expires_at, detached, owner)
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
                self._r.set(prefix + str(i), chunk, px=_STAGE_TTL_MS)
                written = i + 1
            if check is not None:
                check()
            keys = self._ckeys(cid)
            args: list[Any] = [base, token, n, size, self._chunk, time.time(), str(lid), value]
            index_args = [str(cid), size, token, time.time()]

            def build(pipe: Any) -> None:
                if last is not None:
                    pipe.set(prefix + str(n - 1), last, px=_STAGE_TTL_MS)
                self._intent(pipe, cid, lid, expires_at, detached)
                self._pipe_ev(pipe, "commit", keys[:2], args)
                # Sent with the commit to save a round trip; corrected below
                # when the commit found the content present.
                self._pipe_ev(pipe, "idx_commit", self._g_idx()[:4], index_args)

            indexed = True
            written = n
            res = self._run_pipe(build)[-2]
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
                        "idx_commit", self._g_idx()[:4], [str(cid), size, _s(res[3]), time.time()]
                    )
                if status == 2:
                    self._count_dedup()
                    if int(res[2]):
                        self._ev("unretain", [self._k_ret, self._k_rsz, self._k_retb], [str(cid)])
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
                    self._ev("idx_remove", self._g_idx(), [str(cid), token])

    def _wait_durable(self) -> None:
        """With durability="safe", wait until the server has fsynced its AOF
        (WAITAOF, Redis >= 7.2); servers without it or without an AOF keep
        their own persistence settings."""
        with contextlib.suppress(redis.exceptions.ResponseError):
            self._r.execute_command("WAITAOF", 1, 0, 0)

    @_storage_errors
    def _store_file(
        self, source: FileSource, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        self._maintain()
        with ingest.open_source(source, ingest.cannot_read) as f:
            seekable = False
            with contextlib.suppress(AttributeError, OSError, ValueError):
                seekable = bool(f.seekable())
            if seekable:
                return self._store_stream(f, lid, algorithm, ttl, detached)
            # One pass to a private temporary file: the content id must be known
            # before the first chunk is written (chunks live in its hash slot).
            with tempfile.TemporaryFile() as spool:
                for part in ingest.chunks(f):
                    spool.write(part)
                spool.seek(0)
                return self._store_stream(spool, lid, algorithm, ttl, detached)

    def _store_stream(
        self, f: IO[bytes], lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        """Hash a seekable file from its position (first pass), then, unless
        the content is present, upload it chunk by chunk while hashing again
        (second pass); a file that changed in between raises IntegrityError."""
        start = f.tell()
        hasher = new_hasher(algorithm)
        size = ingest.copy(f, hasher)
        cid = ContentId(algorithm, hasher.digest())
        status, _ = self._hold(cid, lid, ttl, detached)
        if status == 2:
            self._count_dedup()
        if status:
            return cid, size
        f.seek(start)
        again = new_hasher(algorithm)
        seen = [0]

        def chunks() -> Iterator[bytes]:
            while seen[0] < size:
                part = f.read(min(self._chunk, size - seen[0]))
                if not part:
                    break
                again.update(part)
                seen[0] += len(part)
                yield bytes(part)

        def check() -> None:
            if seen[0] != size or again.digest() != cid.digest:
                raise IntegrityError("the file changed while it was being stored")

        self._upload(cid, lid, ttl, detached, size, chunks(), check)
        return cid, size

    @_storage_errors
    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        self._maintain()
        status, size = self._hold(cid, lid, ttl, detached)
        if status == 0:
            raise ContentNotFound(cid)
        return size

    @_storage_errors
    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        self._maintain()
        value = _lease_value(None, False, self._owner(new.pid))
        keys = self._ckeys(cid)

        def build(pipe: Any) -> None:
            self._intent(pipe, cid, new, None, False)
            self._pipe_ev(pipe, "take_over", keys, [str(old), str(new), value, time.time()])

        status, size, was_unref, ended = (int(x) for x in self._run_pipe(build)[-1][:4])
        if status == 0:
            self._undo_intent(cid, new, None, False)
            return None
        if status == 2:
            self._touch(cid)
            if was_unref:
                self._ev("unretain", [self._k_ret, self._k_rsz, self._k_retb], [str(cid)])
        if ended:
            # the old lease's bookkeeping (a stale entry would be harmless)
            with contextlib.suppress(redis.exceptions.RedisError):
                pipe = self._r.pipeline(transaction=False)
                pipe.srem(self._proc_key(self._owner(old.pid)), f"L {cid} {old}")
                pipe.zrem(self._k_exp, f"{cid} {old}")
                pipe.execute()
        return size

    def _open(
        self, cid: ContentId, lid: LeaseId, hold_id: str, *, with_first_chunk: bool = False
    ) -> tuple[list[Any], Any]:
        """Check the lease (and record a reader hold): the read script's answer
        and, ``with_first_chunk``, the blob's first chunk fetched alongside."""
        keys = self._ckeys(cid)
        args = [
            self._base(cid),
            str(lid),
            time.time(),
            hold_id,
            self._owner(os.getpid()),
            self._chunk,
            self.policies.retain_bytes,
        ]
        owner = self._owner(os.getpid())

        def build(pipe: Any) -> None:
            if hold_id:
                # By scripts flagged allow-oom (as is read): readers open on a
                # server at maxmemory too.
                self._pipe_ev(
                    pipe, "note", [self._k_procs], ["procs", owner, repr(own_start_time())]
                )
                self._pipe_ev(pipe, "note", [self._proc_key(owner)], ["hold", f"R {cid} {hold_id}"])
            self._pipe_ev(pipe, "read", keys, args)
            if with_first_chunk:
                pipe.get(self._base(cid) + "d:0")

        replies = self._run_pipe(build)
        first = replies[-1] if with_first_chunk else None
        res = list(replies[-2] if with_first_chunk else replies[-1])
        status = int(res[0])
        if status == 1:
            self._touch(cid)
            return res, first
        if hold_id:
            with contextlib.suppress(redis.exceptions.RedisError):
                self._r.srem(self._proc_key(self._owner(os.getpid())), f"R {cid} {hold_id}")
        if status == -1:
            self._ended(str(cid), res)
        raise self._lease_expired(cid, lid)

    def _fetch(
        self, cid: ContentId, token: str, cs: int, size: int, offset: int, length: int
    ) -> bytes:
        """Bytes [offset, offset+length) of the blob stored under upload
        ``token``, fetching only the chunks that hold them. Never bytes of
        another layout: LeaseExpired when that blob is gone (deleted, lost by
        the server, or stored again since, with any chunk size),
        IntegrityError when one of its chunks is missing or short."""
        parts = self._fetch_parts(cid, token, cs, size, offset, length)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fetch_parts(
        self, cid: ContentId, token: str, cs: int, size: int, offset: int, length: int
    ) -> list[bytes]:
        end = min(offset + length, size)
        if end <= offset:
            return [b""]
        base = self._base(cid)
        first, last = offset // cs, (end - 1) // cs
        parts: list[bytes] = []
        i = first
        while i <= last:
            j = min(last + 1, i + max(1, _PIPE_BYTES // cs))
            ranges = []
            for k in range(i, j):
                lo = max(offset, k * cs) - k * cs
                hi = min(end, (k + 1) * cs) - k * cs
                ranges.append((k, lo, hi))
            try:
                *got, current = self._read_chunks(base, cs, size, ranges, atomic=True)
            except redis.exceptions.OutOfMemoryError:
                # A server at maxmemory refuses every command queued in a
                # MULTI. Read in a plain pipeline: the token is read after the
                # chunks on the same connection, and a token is never current
                # twice, so if it is still this blob's the chunks were too.
                *got, current = self._read_chunks(base, cs, size, ranges, atomic=False)
            if current is None or _s(current) != token:
                raise self._layout_gone(cid)
            for (k, lo, hi), piece in zip(ranges, got, strict=True):
                if piece is None or len(piece) != hi - lo:
                    raise IntegrityError(f"chunk {k} of {cid} is missing or has the wrong size")
                parts.append(piece)
            i = j
        return parts

    def _read_chunks(
        self, base: str, cs: int, size: int, ranges: list[tuple[int, int, int]], *, atomic: bool
    ) -> list[Any]:
        """The byte ranges (chunk, lo, hi) of chunks under ``base``, then the
        meta's upload token, read in one MULTI when ``atomic``: the chunks read
        are those of the blob with that token (chunk keys are reused when the
        same content is stored again, with any chunk size)."""
        pipe = self._r.pipeline(transaction=atomic)
        for k, lo, hi in ranges:
            if lo == 0 and hi == min(cs, size - k * cs):
                pipe.get(f"{base}d:{k}")
            else:
                pipe.getrange(f"{base}d:{k}", lo, hi - 1)
        pipe.hget(base + "m", "t")
        return list(pipe.execute())

    @staticmethod
    def _layout_gone(cid: ContentId) -> LeaseExpired:
        return LeaseExpired(
            f"content {cid} is gone from the server (deleted, lost or stored again "
            "since it was opened): its hold was lost",
            content_id=cid,
        )

    def _chunk_lost(self, cid: ContentId, token: str, index: int) -> None:
        current = self._r.hget(self._base(cid) + "m", "t")
        if current is None or _s(current) != token:
            raise self._layout_gone(cid)
        raise IntegrityError(f"chunk {index} of {cid} is missing or has the wrong size")

    @_storage_errors
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
                self._chunk_lost(cid, _s(res[4]), 0)
            first = b""
        parts = [first]
        if n > 1:
            parts += self._fetch_parts(cid, _s(res[4]), cs, size, cs, size - cs)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != size:
            raise IntegrityError(f"{cid} has {len(data)} bytes stored, not {size}")
        if self.policies.verify_reads:
            check_hash(cid, data)
        return data

    @_storage_errors
    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        self._maintain()
        hold_id = uuid.uuid4().hex
        res, _ = self._open(cid, lid, hold_id)
        size, cs, token = int(res[1]), int(res[3]), _s(res[4])
        try:
            if self.policies.verify_reads:
                hasher = new_hasher(cid.algorithm)
                for off in range(0, size, cs):
                    hasher.update(self._fetch(cid, token, cs, size, off, cs))
                if hasher.digest() != cid.digest:
                    raise IntegrityError(f"data does not hash to {cid}")
        except BaseException:
            self._release_reader(cid, hold_id)
            raise
        pid = os.getpid()
        ref = weakref.ref(self)

        @_storage_errors
        def fetch(offset: int, length: int) -> bytes:
            storage = ref()
            if storage is None or storage._closed:
                raise StorageError("the storage is closed")
            return storage._fetch(cid, token, cs, size, offset, length)

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
                pipe, "end", self._end_keys(cid_text), self._end_args(cid_text, "R", hold_id, "")
            )
            pipe.srem(key, f"R {cid} {hold_id}")

        self._ended(cid_text, self._run_pipe(build)[0])

    @_storage_errors
    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        self._maintain()
        cid_text = str(cid)
        member = f"L {cid} {lid}"

        def build(pipe: Any) -> None:
            self._pipe_ev(
                pipe, "end", self._end_keys(cid_text), self._end_args(cid_text, "L", str(lid), "")
            )
            # Dropping a lease that is not held leaves no bookkeeping to remove,
            # so these are harmless either way.
            pipe.srem(self._proc_key(self._owner(lid.pid)), member)
            pipe.zrem(self._k_exp, f"{cid} {lid}")

        self._ended(cid_text, self._run_pipe(build)[0])

    @_storage_errors
    def _advise_of_pid(self, pid: int) -> None:
        self._maintain()
        if not can_judge_pids():
            return  # /proc shows another pid namespace: its start time is unknowable
        start = process_start_time(pid)
        if start is None:
            return
        owner = self._owner(pid)
        known = self._r.hget(self._k_procs, owner)
        if known is not None and not same_start(float(_s(known)), start):  # the pid was reused
            self._terminate(owner)
            self._r.hdel(self._k_procs, owner)
        self._vouch(pid)
        self._r.hset(self._k_procs, owner, repr(start))

    @_storage_errors
    def _advise_pid_terminated(self, pid: int) -> None:
        self._maintain()
        owner = self._owner(pid)
        self._terminate(owner)
        self._r.hdel(self._k_procs, owner)

    @_storage_errors
    def _contains(self, cid: ContentId) -> bool:
        self._maintain()
        return bool(self._r.exists(self._base(cid) + "m"))

    @_storage_errors
    def _stat(self, cid: ContentId) -> BlobInfo:
        self._maintain()
        keys = self._ckeys(cid)
        meta, leases, readers = self._run_pipe(
            lambda p: [p.hmget(keys[0], "s", "cr", "a"), p.hvals(keys[1]), p.hlen(keys[2])]
        )
        if meta[0] is None:
            raise ContentNotFound(cid)
        now = time.time()
        live = 0
        for value in leases:
            exp, _, _ = _parse_lease_value(value)
            if exp is None or exp > now:
                live += 1
        return BlobInfo(cid, int(meta[0]), live, int(readers), float(meta[1]), float(meta[2]))

    def _present(self) -> list[str]:
        """Content ids in the LRU index whose meta exists."""
        cids = [_s(c) for c in self._r.zrange(self._k_lru, 0, -1)]
        found = self._each(cids, lambda p, c: p.exists(self._base(c) + "m"))
        return [c for c, x in zip(cids, found, strict=True) if x]

    @_storage_errors
    def _iter_content(self) -> list[ContentId]:
        self._maintain()
        return [ContentId.parse(c) for c in self._present()]

    def _all_leases(self, cids: list[str]) -> Iterator[tuple[str, str, Any, dict[Any, Any]]]:
        """(content id, lease id, lease value, readers) for every content."""
        for i in range(0, len(cids), _BATCH):
            batch = cids[i : i + _BATCH]

            def build(p: Any, b: list[str] = batch) -> None:
                for c in b:
                    p.hgetall(self._base(c) + "l")
                    p.hgetall(self._base(c) + "r")

            res = self._run_pipe(build)
            for k, c in enumerate(batch):
                leases, readers = res[2 * k], res[2 * k + 1]
                if not leases:
                    yield c, "", None, readers
                for lid, value in leases.items():
                    yield c, _s(lid), value, readers

    @_storage_errors
    def _iter_leases(self) -> list[LeaseInfo]:
        self._maintain()
        now = time.time()
        out: list[LeaseInfo] = []
        for cid_text, lid_text, value, _ in self._all_leases(self._present()):
            if value is None:
                continue
            exp, detached, _owner = _parse_lease_value(value)
            if exp is not None and exp <= now:
                continue
            lid = LeaseId.parse(lid_text)
            out.append(LeaseInfo(lid, ContentId.parse(cid_text), lid.pid, exp, detached))
        return out

    @_storage_errors
    def _why(self, cid: ContentId) -> WhyReport:
        """Leases and reader holds with the host (``<host id>.ns<pid
        namespace>``) of their owner; lease times are not recorded here."""
        self._maintain()
        keys = self._ckeys(cid)
        meta, leases, holds, rank = self._run_pipe(
            lambda p: [
                p.hmget(keys[0], "s", "cr", "a"),
                p.hgetall(keys[1]),
                p.hvals(keys[2]),
                p.zscore(self._k_ret, str(cid)),
            ]
        )
        if meta[0] is None:
            raise ContentNotFound(cid)
        now = time.time()
        infos = []
        for lid_text, value in leases.items():
            exp, detached, owner = _parse_lease_value(value)
            if exp is not None and exp <= now:
                continue
            lid = LeaseId.parse(_s(lid_text))
            host = owner.rpartition("/")[0]
            infos.append(
                LeaseInfo(lid, cid, lid.pid, exp, detached, None, host, host == self._local)
            )
        infos.sort(key=lambda i: str(i.lease_id))
        readers = []
        for owner, count in sorted(collections.Counter(_s(v) for v in holds).items()):
            host, _, pid_text = owner.rpartition("/")
            pid = int(pid_text) if pid_text.isdigit() else None
            readers.append(ReaderInfo(pid, count, host, host == self._local))
        info = BlobInfo(cid, int(meta[0]), len(infos), len(holds), float(meta[1]), float(meta[2]))
        return WhyReport(info, tuple(infos), tuple(readers), retained=rank is not None)

    @_storage_errors
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
            exp, _, _ = _parse_lease_value(value)
            if exp is not None and exp <= now:
                continue
            leases += 1
            owners.add(_parse_lease_value(value)[2])
        total, reserved, dedup, retb, nret, evicted = self._run_pipe(
            lambda p: [
                p.get(self._k_bytes),
                p.get(self._k_resb),
                p.get(self._k_dedup),
                p.get(self._k_retb),
                p.zcard(self._k_ret),
                p.hmget(self._k_evict, "n", "b"),
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

    # -- collect and verify ----------------------------------------------------------

    def _scan(self, pattern: str) -> list[str]:
        return [_s(k) for k in self._r.scan_iter(match=pattern, count=_SCAN_COUNT)]

    def _metas(self) -> dict[str, dict[str, str]]:
        """Every content's meta found by scanning the keyspace (the repair view)."""
        keys = [
            k
            for k in self._scan(f"{self._namespace}:{{*}}:m")
            if not k.startswith(f"{self._namespace}:{{p:")
        ]
        out: dict[str, dict[str, str]] = {}
        res = self._each(keys, lambda p, k: p.hgetall(k))
        for key, meta in zip(keys, res, strict=True):
            if meta:
                cid_text = key[len(self._namespace) + 2 : -3]
                out[cid_text] = {_s(k): _s(v) for k, v in meta.items()}
        return out

    def _writer_dead(self, token: str, heartbeats: dict[str, bool]) -> bool:
        """Whether the writer named in an upload token is gone (so its staging
        keys and reservation are leftovers)."""
        host, pid_text = [*token.split("/"), "", ""][:2]
        owner = f"{host}/{pid_text}"
        if host == self._local and pid_text == str(os.getpid()):
            with self._lock:
                return token not in self._active_tokens
        return self._is_dead(owner, 0.0, heartbeats.get(owner, False))

    @_storage_errors
    def _collect(self) -> CollectReport:
        self._check_open()
        self._ensure_process()
        with self._reap_lock:
            self._flush_touches()
            before = self._r.get(self._k_bytes), self._r.get(self._k_resb)
            before_blobs = len(self._present())
            expired = self._expire()
            leases, readers, procs = self._reap_dead()
            self._next_reap = time.monotonic() + self.policies.reap_interval
            more_leases, more_readers, rows = self._sweep()
            after_blobs = len(self._present())
            after = self._r.get(self._k_bytes), self._r.get(self._k_resb)
        freed = (int(before[0] or 0) - int(before[1] or 0)) - (
            int(after[0] or 0) - int(after[1] or 0)
        )
        return CollectReport(
            leases_reaped=leases + expired + more_leases,
            readers_reaped=readers + more_readers,
            processes_reaped=procs,
            blobs_deleted=max(before_blobs - after_blobs, 0),
            bytes_freed=max(freed, 0),
            rows_removed=rows,
        )

    def _sweep(self) -> tuple[int, int, int]:
        """The repair pass of collect(): every content's leases and holds are
        checked against their owners' liveness (so a crash between a
        content's script and the global bookkeeping cannot leak), unreferenced
        content not retained is deleted, and the global index, staging keys
        and reservations of dead writers are reconciled. Returns (leases,
        readers, index rows and keys removed)."""
        metas = self._metas()
        retained = {_s(c) for c in self._r.zrange(self._k_ret, 0, -1)}
        owners: set[str] = set()
        rows: list[tuple[str, str, Any, dict[Any, Any]]] = list(self._all_leases(list(metas)))
        for _c, _l, value, holds in rows:
            if value is not None:
                owners.add(_parse_lease_value(value)[2])
            owners.update(_s(o) for o in holds.values())
        procs = {_s(k): _s(v) for k, v in self._r.hgetall(self._k_procs).items()}
        owners.update(procs)
        beats = self._heartbeats(sorted(owners))
        dead = {o for o in owners if self._is_dead(o, float(procs.get(o) or 0), beats[o])}
        now = time.time()
        leases = readers = removed = 0
        done_readers: set[str] = set()
        for cid_text, lid_text, value, holds in rows:
            if cid_text not in done_readers:
                done_readers.add(cid_text)
                for hold_id, owner in holds.items():
                    if _s(owner) in dead:
                        readers += self._end(cid_text, "RO", _s(hold_id), _s(owner))
            if value is None:
                continue
            exp, detached, owner = _parse_lease_value(value)
            if exp is not None and exp <= now:
                leases += self._end(cid_text, "LE", lid_text)
            elif owner in dead and not detached:
                leases += self._end(cid_text, "LO", lid_text, owner)
        # Content nobody holds that is not in the retained set: finish its
        # unreferenced step (retain or delete).
        for cid_text, meta in metas.items():
            keys = self._ckeys(cid_text)
            nleases, nreaders = self._run_pipe(
                lambda p, k=keys: [p.hvals(k[1]), p.hlen(k[2])]  # type: ignore[misc]
            )
            live = [v for v in nleases if (_parse_lease_value(v)[0] or math.inf) > now]
            if not live and not int(nreaders) and cid_text not in retained:
                self._unreferenced(ContentId.parse(cid_text), int(meta.get("s", 0)))
        # The index: entries whose content is gone, reservations of dead
        # writers; content missing from the index.
        index = {_s(k): _s(v) for k, v in self._r.hgetall(self._k_idx).items()}
        metas = self._metas()
        writers = {"/".join(v.split(" ")[1].split("/")[:2]) for v in index.values()}
        beats = self._heartbeats(sorted(writers | {self._owner(os.getpid())}))
        for cid_text, value in index.items():
            fields = value.split(" ")
            found = metas.get(cid_text)
            if found is not None and found.get("t") == fields[1]:
                continue
            if found is not None:
                self._ev(
                    "idx_commit", self._g_idx()[:4], [cid_text, found.get("s", 0), found["t"], now]
                )
                continue
            # No meta: a leftover, unless its upload is still in flight (on a
            # cluster the index update can land before the commit).
            reservation = len(fields) >= 5 and fields[2] == "R"
            expired = reservation and float(fields[3]) <= now
            if not expired and not self._writer_dead(fields[1], beats):
                continue
            removed += int(self._ev("idx_remove", self._g_idx(), [cid_text, fields[1]]))
        for cid_text, meta in metas.items():
            if cid_text not in index:
                self._ev(
                    "idx_commit",
                    self._g_idx()[:4],
                    [cid_text, meta.get("s", 0), meta.get("t", ""), now],
                )
        # Staging chunks of dead writers and chunks no meta names.
        stray = self._stray_chunks(metas, beats, include_live_staging=False)
        removed += self._drop_stray(stray)
        self._ev(
            "retain",
            [self._k_ret, self._k_rsz, self._k_retb],
            ["", now, 0, self.policies.retain_bytes],
        )
        # Leases and reader hashes without a meta.
        removed += self._drop_stray(self._orphan_hashes(metas))
        return leases, readers, removed

    def _stray_chunks(
        self,
        metas: dict[str, dict[str, str]],
        beats: dict[str, bool],
        *,
        include_live_staging: bool,
    ) -> list[str]:
        """Chunk keys that belong to no committed blob: staging of dead writers
        (and of live ones when ``include_live_staging``) and committed-looking
        chunks no meta names."""
        out: list[str] = []
        ns = re.escape(self._namespace)
        candidates: list[tuple[str, str, int]] = []
        for key in self._scan(f"{self._namespace}:{{*}}:d:*"):
            m = re.fullmatch(ns + r":\{([^}]*)\}:d:(\d+)", key)
            if m is None:
                continue
            meta = metas.get(m.group(1))
            if meta is None or int(m.group(2)) >= int(meta.get("n", 0)):
                candidates.append((key, m.group(1), int(m.group(2))))
        # Content committed since the snapshot is not stray: look again.
        now = self._current(sorted({c for _, c, _ in candidates}))
        for key, cid_text, index in candidates:
            current = now.get(cid_text)
            if current is None or index >= int(current[1]):
                out.append(key)
        staged: list[tuple[str, str]] = []
        for key in self._scan(f"{self._namespace}:{{*}}:c:*"):
            m = re.fullmatch(ns + r":\{([^}]*)\}:c:([^:]+):(\d+)", key)
            if m is not None:
                staged.append((key, m.group(2)))
        writers = {"/".join(token.split("/")[:2]) for _, token in staged}
        missing = sorted(w for w in writers if w not in beats)
        if missing:
            beats = {**beats, **self._heartbeats(missing)}
        for key, token in staged:
            if include_live_staging or self._writer_dead(token, beats):
                out.append(key)
        return out

    def _drop_stray(self, keys: list[str]) -> int:
        """Delete content keys that no meta names, rechecking each atomically
        in its content's slot (content committed since the scan is kept)."""
        by_content: dict[str, list[str]] = {}
        pattern = re.compile(re.escape(self._namespace) + r":\{([^}]*)\}:(.+)")
        for key in keys:
            m = pattern.fullmatch(key)
            if m is not None:
                by_content.setdefault(m.group(1), []).append(m.group(2))
        deleted = 0
        for cid_text, suffixes in by_content.items():
            base = self._base(cid_text)
            for i in range(0, len(suffixes), _BATCH):
                batch = suffixes[i : i + _BATCH]
                deleted += int(self._ev("drop_stray", [base + "m"], [base, *batch]))
        return deleted

    def _each(self, items: list[str], command: Callable[[Any, str], object]) -> list[Any]:
        """``command(pipe, item)`` for every item, pipelined in batches; the replies."""
        out: list[Any] = []
        for i in range(0, len(items), _BATCH):
            batch = items[i : i + _BATCH]

            def build(pipe: Any, b: list[str] = batch) -> None:
                for item in b:
                    command(pipe, item)

            out.extend(self._run_pipe(build))
        return out

    def _orphan_hashes(self, metas: dict[str, dict[str, str]]) -> list[str]:
        """Leases and readers hashes of content that has no meta."""
        candidates: list[tuple[str, str]] = []
        for suffix in ("l", "r"):
            for key in self._scan(f"{self._namespace}:{{*}}:{suffix}"):
                m = re.fullmatch(re.escape(self._namespace) + r":\{([^}]*)\}:[lr]", key)
                if m is None or m.group(1).startswith("p:"):
                    continue
                if m.group(1) not in metas:
                    candidates.append((key, m.group(1)))
        now = self._current(sorted({c for _, c in candidates}))
        return [key for key, cid_text in candidates if cid_text not in now]

    def _current(self, cids: list[str]) -> dict[str, tuple[str, int]]:
        """(token, chunk count) of those contents that exist now."""
        res = self._each(cids, lambda p, c: p.hmget(self._base(c) + "m", "t", "n"))
        return {c: (_s(t), int(n)) for c, (t, n) in zip(cids, res, strict=True) if t is not None}

    @_storage_errors
    def _verify(self, repair: bool) -> VerifyReport:
        self._maintain()
        metas = self._metas()
        report = VerifyReport(checked=len(metas))
        tokens: dict[ContentId, str] = {}
        for cid_text, meta in sorted(metas.items()):
            cid = ContentId.parse(cid_text)
            size, n, cs = int(meta["s"]), int(meta["n"]), int(meta["c"])
            hasher = new_hasher(cid.algorithm)
            prefix = f"{self._base(cid)}d:"
            found = bad = 0
            for i in range(n):
                piece = self._r.get(prefix + str(i))
                want = cs if i < n - 1 else size - (n - 1) * cs
                if piece is None:
                    bad += 1
                    continue
                found += 1
                if len(piece) != want:
                    bad += 1
                hasher.update(piece)
            broken = bool(n and not found) or bool(bad) or hasher.digest() != cid.digest
            if broken and self._current([cid_text]).get(cid_text, ("", 0))[0] != meta["t"]:
                continue  # deleted or stored anew while it was being read
            tokens[cid] = meta["t"]
            if n and not found:
                report.missing.append(cid)
            elif broken:
                report.corrupted.append(cid)
        beats = self._heartbeats([self._owner(os.getpid())])
        stray = self._stray_chunks(metas, beats, include_live_staging=False)
        orphans = self._orphan_hashes(metas)
        index = {_s(k): _s(v) for k, v in self._r.hgetall(self._k_idx).items()}
        stale = [
            c
            for c, v in index.items()
            if c not in metas and not (len(v.split(" ")) >= 5 and v.split(" ")[2] == "R")
        ]
        now = self._current(stale)
        stale = [c for c in stale if c not in now]
        report.orphaned.extend(stray + orphans + [f"{self._k_idx}/{c}" for c in stale])
        if repair and report:
            for cid in report.corrupted + report.missing:
                self._delete(str(cid), "force", tokens[cid])
            self._drop_stray(stray + orphans)
            for c in stale:
                self._ev("idx_remove", self._g_idx(), [c, ""])
            report.repaired = True
        return report

    @_storage_errors
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
        meta = self._r.hgetall(self._base(cid) + "m")
        return [f"{self._base(cid)}d:{i}" for i in range(int(meta[b"n"]))]

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


def _after_fork(ref: weakref.ref[RedisStorage]) -> None:
    storage = ref()
    if storage is None:
        return
    storage._lock = threading.RLock()
    storage._reap_lock = threading.Lock()
    storage._touches = {}
    storage._active_tokens = set()
    storage._pending_releases = []


def _memory_chunks(data: memoryview, size: int) -> Iterator[memoryview]:
    for off in range(0, len(data), size):
        yield data[off : off + size]
