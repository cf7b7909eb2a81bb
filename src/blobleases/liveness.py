"""Process liveness: is a process that took a lease still alive?

Two mechanisms:

* **Owner locks** (what a process uses for itself in a
  :class:`~blobleases.directory.DirectoryStorage`): the process holds a POSIX
  ``fcntl`` write lock on a file of its own in the store (``owners/<token>``,
  a random token new in every process). The kernel holds the lock for the
  process and drops it when the process ends, SIGKILL included; it is not
  inherited across ``fork``. Any process, whatever its pid namespace, asks
  the kernel whether the lock is held (``F_GETLK``, which acquires
  nothing): no pid arithmetic, so neither pid reuse nor pid namespaces can
  fool it (Nix's temporary GC roots work the same way).
* **Pid and start time** (for leases a process takes on behalf of another
  pid, ``LeaseId.new(pid=...)``, which can hold no lock): a pid reused by a
  new process never keeps a dead process's leases alive. A pid means
  something only in the pid namespace that recorded it and only where
  ``/proc`` shows that namespace, so it is judged only there
  (:func:`pid_scope`, :func:`can_judge_pids`). Zombies are dead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from functools import lru_cache
from typing import ClassVar

import psutil

__all__ = [
    "START_TIME_TOLERANCE",
    "HeartbeatThread",
    "OwnerLock",
    "can_judge_pids",
    "is_alive",
    "is_dead",
    "is_owner_token",
    "own_start_time",
    "owner_alive",
    "pid_namespace",
    "pid_scope",
    "probe_owner",
    "process_start_time",
    "process_token",
    "remove_dead_owner",
    "same_start",
    "vouch",
]

#: Start times come from clock ticks since boot; two readings of the same
#: process agree far closer than this, and two processes sharing a pid
#: cannot start this close together.
START_TIME_TOLERANCE = 0.05


def process_start_time(pid: int) -> float | None:
    """The start time of live process ``pid`` (seconds since the epoch), or
    None if there is no such process or it is a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return 0.0  # exists but hidden from us: alive, start time unknown


@lru_cache(maxsize=4)
def _start_time_of(pid: int) -> float:
    # /proc/self is this process whatever pid namespace /proc was mounted
    # for; /proc/<os.getpid()> is another process when it is not ours.
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
    except (OSError, ValueError, IndexError):
        start = process_start_time(pid)
        return 0.0 if start is None else start


def own_start_time() -> float:
    """This process's start time (cached per pid, so it is right after fork),
    read from ``/proc/self`` so it is right in any pid namespace."""
    return _start_time_of(os.getpid())


@lru_cache(maxsize=4)
def _namespace_of(pid: int) -> tuple[str, str, bool]:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
        inode = link[link.index("[") + 1 : link.index("]")]
    except (OSError, ValueError):
        inode = "unknown"
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    try:
        own_proc = os.readlink("/proc/self") == str(pid)
    except OSError:
        own_proc = False
    return inode, f"{inode}@{boot}", own_proc and inode != "unknown"


def pid_namespace() -> str:
    """The inode number of this process's pid namespace (as text)."""
    return _namespace_of(os.getpid())[0]


def pid_scope() -> str:
    """Where this process's pids mean something: its pid namespace on this
    boot of this machine (``<namespace inode>@<boot id>``)."""
    return _namespace_of(os.getpid())[1]


def can_judge_pids() -> bool:
    """Whether ``/proc`` shows this process's own pid namespace (it does not
    in ``unshare -p`` without ``--mount-proc``: pids of this namespace
    cannot then be looked up at all)."""
    return _namespace_of(os.getpid())[2]


def is_alive(pid: int, start_time: float | None) -> bool:
    """Whether ``pid`` is alive and (when ``start_time`` is known and not 0)
    is the same process that started at ``start_time``."""
    now_start = process_start_time(pid)
    return now_start is not None and same_start(start_time, now_start)


def same_start(recorded: float | None, current: float | None) -> bool:
    """Whether two start times name the same process (an unknown one, None
    or 0, matches any)."""
    if not recorded or not current:
        return True
    return abs(recorded - current) <= START_TIME_TOLERANCE


# -- owner locks -------------------------------------------------------------------

_TOKEN = re.compile(r"[0-9a-f]{32}")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_PROBE = os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC
_O_LOCK = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC
# struct flock on Linux: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
_FLOCK = "hhqqi4x"
_PROBE_WRITE_LOCK = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


def is_owner_token(text: str) -> bool:
    """Whether ``text`` has the form of an owner token (32 lowercase hex)."""
    return _TOKEN.fullmatch(text) is not None


class _Process:
    token = ""
    pid = 0


_process = _Process()
_registry_lock = threading.Lock()


def process_token() -> str:
    """This process's owner token: random (128 bits), new in every process
    (a forked child gets its own)."""
    pid = os.getpid()
    if _process.pid != pid:
        with _registry_lock:
            if _process.pid != pid:
                _process.token = secrets.token_hex(16)
                _process.pid = pid
    return _process.token


def probe_owner(owners_fd: int, token: str) -> bool | None:
    """Whether the owner ``token`` (never this process's own: opening its
    own file and closing it would drop its lock) holds its lock file in the
    directory ``owners_fd``: True (locked: alive), False (unlocked: dead),
    None (no such file). Acquires nothing."""
    try:
        fd = os.open(token, _O_PROBE, dir_fd=owners_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # a symlink is no owner's; anything else: assume alive, never reap on doubt
        return exc.errno != errno.ELOOP
    try:
        reply = fcntl.fcntl(fd, fcntl.F_GETLK, _PROBE_WRITE_LOCK)
    except OSError:
        return True
    finally:
        os.close(fd)
    return bool(struct.unpack(_FLOCK, reply)[0] != fcntl.F_UNLCK)


def owner_alive(owners_fd: int, token: str) -> bool:
    """Whether the owner ``token`` (never this process's own) holds its lock
    file in ``owners_fd``: missing or unlocked means dead (see :func:`probe_owner`)."""
    return probe_owner(owners_fd, token) is True


def remove_dead_owner(owners_fd: int, token: str) -> bool:
    """Remove the lock file of owner ``token`` if its owner is dead (never
    call it with this process's own token): taking the lock first, so a
    live owner's file (locked) is never removed. True if it is gone."""
    try:
        fd = os.open(token, os.O_RDWR | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=owners_fd)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # held: alive
    try:
        st, now = os.fstat(fd), os.stat(token, dir_fd=owners_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            os.unlink(token, dir_fd=owners_fd)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock taken above


class OwnerLock:
    """This process's lock file in one store: ``owners/<token>``, locked for
    the process's life (or until every handle that used it let go of it).

    One per process and store (keyed by the store root's ``(st_dev,
    st_ino)``), shared by every handle of the store in the process; a forked
    child starts with none (its parent's lock is not inherited)."""

    _all: ClassVar[dict[tuple[int, int], OwnerLock]] = {}

    def __init__(self, key: tuple[int, int], fd: int, token: str) -> None:
        self.key = key
        self.fd = fd
        self.token = token
        self.pid = os.getpid()
        self.users = 0
        self.generation = 0

    @classmethod
    def acquire(cls, key: tuple[int, int], owners_fd: int) -> OwnerLock:
        """This process's lock in the store ``key`` (whose ``owners``
        directory is ``owners_fd``), created and locked if needed, with one
        more user. OSError if the file cannot be created or locked."""
        token = process_token()
        with _registry_lock:
            lock = cls._all.get(key)
            if lock is None or lock.pid != os.getpid():
                lock = cls._all[key] = cls(key, cls._create(owners_fd, token), token)
            lock.users += 1
            lock.generation += 1
            return lock

    @staticmethod
    def _create(owners_fd: int, token: str) -> int:
        deadline = time.monotonic() + 30.0
        while True:
            fd = os.open(token, _O_LOCK, 0o600, dir_fd=owners_fd)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    # a remover took it to unlink a dead owner's file of
                    # this name (an earlier lock of this process): retry
                    if time.monotonic() > deadline:
                        raise
                    os.close(fd)
                    fd = -1
                    time.sleep(0.001)
                    continue
                st = os.fstat(fd)
                try:
                    now = os.stat(token, dir_fd=owners_fd, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # unlinked before we locked it: start again
                    fd = -1
                    continue
                info = (
                    f"pid={os.getpid()}\nstart={own_start_time()!r}\n"
                    f"host={socket.gethostname()}\npidns={pid_namespace()}\n"
                    f"argv0={sys.argv[0] if sys.argv else ''}\n"
                )
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode(errors="replace"), 0)
                return fd
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise

    def ensure_linked(self, owners_fd: int) -> bool:
        """Make sure the lock file is still ``owners/<token>`` in the
        directory ``owners_fd`` (someone may have removed it, or the whole
        directory, behind our back: other processes would take us for dead):
        if not, create and lock it again. True if it had to be re-created."""
        with _registry_lock:
            if self.pid != os.getpid() or self._all.get(self.key) is not self:
                return False
            try:
                st = os.fstat(self.fd)
                now = os.stat(self.token, dir_fd=owners_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return False
            except FileNotFoundError:
                pass
            fd = self._create(owners_fd, self.token)
            old, self.fd = self.fd, fd
            with contextlib.suppress(OSError):
                os.close(old)  # releases only the lock on the old, unlinked file
            return True

    def release(self) -> int:
        """One user fewer; returns the generation to pass to :meth:`drop`."""
        with _registry_lock:
            self.users -= 1
            return self.generation

    def drop(self, owners_fd: int, generation: int) -> bool:
        """Unlink and unlock the file if no user took the lock since
        :meth:`release` returned ``generation`` (the caller has removed
        every row naming the token). True if dropped."""
        with _registry_lock:
            if self.users > 0 or self.generation != generation or self.pid != os.getpid():
                return False
            if self._all.get(self.key) is self:
                del self._all[self.key]
            with contextlib.suppress(OSError):
                os.unlink(self.token, dir_fd=owners_fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            return True

    @classmethod
    def forget(cls, key: tuple[int, int]) -> None:
        """The store ``key`` was removed: close this process's lock of it."""
        with _registry_lock:
            lock = cls._all.get(key)
            if lock is not None and lock.pid == os.getpid():
                del cls._all[key]
                with contextlib.suppress(OSError):
                    os.close(lock.fd)

    @classmethod
    def _forget_inherited(cls) -> None:
        global _registry_lock
        _registry_lock = threading.Lock()
        for lock in cls._all.values():
            with contextlib.suppress(OSError):
                os.close(lock.fd)  # releases nothing of the parent's
        cls._all = {}


os.register_at_fork(after_in_child=OwnerLock._forget_inherited)


class HeartbeatThread:
    """What every heartbeat of a shared backend (Redis keys, PostgreSQL rows)
    does alike: a daemon thread calls :meth:`beat` every ``interval``
    seconds in the process that made it (never in a forked child), for this
    process and for the local pids this handle vouches for (``adopt``);
    :meth:`live_adopted` drops the vouched pids that died. A subclass writes
    the heartbeats in :meth:`beat` and calls :meth:`start_beating` at the
    end of its ``__init__``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.pid = os.getpid()
        self.start = own_start_time()
        self.adopted: dict[int, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def start_beating(self, name: str) -> None:
        """Beat once now, then every ``interval`` in a daemon thread."""
        self.beat()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def beat(self) -> None:
        """Refresh this process's heartbeat and those of :meth:`live_adopted`."""
        raise NotImplementedError

    def live_adopted(self) -> list[tuple[int, float]]:
        """The vouched pids (with start times) still alive; dead ones are
        forgotten. Where /proc shows another pid namespace a vouched pid
        cannot be checked: it is kept as long as this process beats."""
        with self.lock:
            adopted = list(self.adopted.items())
        alive = []
        for pid, start in adopted:
            if not can_judge_pids() or is_alive(pid, start):
                alive.append((pid, start))
            else:
                with self.lock:
                    self.adopted.pop(pid, None)
        return alive

    def adopt(self, pid: int, start: float) -> None:
        with self.lock:
            self.adopted[pid] = start

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


def vouch(hb: HeartbeatThread, pid: int) -> float:
    """Record a local pid as alive (its heartbeat kept by ``hb``'s thread:
    RedisStorage's key, PostgresStorage's owners row); returns its start
    time (0.0 if unknown; the pid may be dead)."""
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


def is_dead(
    owner: str, start: float, heartbeat: bool, local: str, hb: HeartbeatThread | None
) -> bool:
    """Whether ``owner`` (``<host>/<pid>``) is dead: an owner of this host
    and pid namespace (``local``) is judged by its pid and start time where
    /proc shows them, and is alive while ``hb`` vouches for it; any other
    owner is alive while its ``heartbeat`` is fresh (within
    ``heartbeat_ttl``)."""
    host, _, pid_text = owner.rpartition("/")
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if host == local:
        if pid == os.getpid():
            return False
        if can_judge_pids() and not is_alive(pid, start or None):
            return True
        if hb is not None and hb.vouches(pid):
            return False
    return not heartbeat
