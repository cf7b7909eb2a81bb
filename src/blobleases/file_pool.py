"""Recycled blob files: a DirectoryStorage may keep the files of content it
deletes and write new blobs into them, instead of unlinking them and
creating new ones.

On tmpfs (``shm://``) most of the cost of storing a blob is the kernel
allocating and zeroing fresh pages, and of deleting one freeing them again:
writing 8 MiB into a new tmpfs file costs about 3x writing it over an
existing one. A handle with a pool (:class:`FilePool`, off by default; the
executor's private stores turn it on) moves a deleted blob's file into
``tmp/`` under a pool name instead of unlinking it, while the pool stays
within its bounds, and a store claims the best-fitting pool file (an
atomic rename to its own temporary name) before creating one.

A file is only ever rewritten when no process has it open or mapped, as
the kernel says: a write lease (``F_SETLEASE``) is granted only on a file
that no other open file description refers to, and every mapping holds
one (inherited ones in forked children too). A pool file that is still
mapped somewhere (a view kept past its hold, say) is unlinked instead, so
bytes someone can still see never change. Pool files are named as
temporary files of the process that pooled them (``<owner token>-8...``,
where a temporary file's 16 hex digits start with 0-7), so ``collect()``
removes those of dead processes and ``verify()`` sees nothing wrong.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import stat as stat_module
from dataclasses import dataclass

__all__ = ["POOL_MIN", "FilePool", "claim", "keep", "temp_suffix"]

#: Files smaller than this are neither pooled nor claimed (for them the
#: directory listing and the lease check cost more than they save).
POOL_MIN = 256 << 10
_MAX_SIZE = 16**9 - 1  # the size field of a pool name: 9 hex digits
_POOL_NAME = re.compile(r"[0-9a-f]{32}-8([0-9a-f]{9})[0-9a-f]{6}\.tmp")
_O_CLAIM = os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", None)
#: Claims tried per store before creating a new file.
_TRIES = 4

_counter = itertools.count()
# False once the kernel refused a lease for lack of support: no pooling.
_leases_work = _F_SETLEASE is not None


@dataclass(frozen=True)
class FilePool:
    """A handle's bounds on its pool: at most ``max_files`` files and
    ``max_bytes`` bytes (counted over every process's pool files)."""

    max_files: int
    max_bytes: int


def temp_suffix() -> str:
    """The 16 hex digits of a new temporary file name of this process: a
    counter (the owner token before it is new in every process), below
    8000... so that it never looks like a pool name."""
    return f"{next(_counter) & ((1 << 63) - 1):016x}"


def _pool_name(token: str, size: int) -> str:
    return f"{token}-8{size:09x}{next(_counter) & 0xFFFFFF:06x}.tmp"


def _entries(tmp_fd: int) -> list[tuple[int, str]]:
    """(size, name) of the pool files in ``tmp/``."""
    out = []
    for name in os.listdir(tmp_fd):
        match = _POOL_NAME.fullmatch(name)
        if match is not None:
            out.append((int(match.group(1), 16), name))
    return out


def keep(pool: FilePool, shard_fd: int, name: str, tmp_fd: int, token: str) -> bool:
    """Move the unreferenced blob file ``name`` of ``shard_fd`` into the pool
    if it is a regular file with one link, of at least :data:`POOL_MIN`
    bytes, and the pool has room; False if it did not (the caller unlinks
    it). FileNotFoundError if there is no such file."""
    st = os.stat(name, dir_fd=shard_fd, follow_symlinks=False)
    size = st.st_size
    if (
        not _leases_work
        or not stat_module.S_ISREG(st.st_mode)
        or st.st_nlink != 1
        or not POOL_MIN <= size <= _MAX_SIZE
    ):
        return False
    try:
        entries = _entries(tmp_fd)
    except OSError:
        return False
    if len(entries) >= pool.max_files or sum(s for s, _ in entries) + size > pool.max_bytes:
        return False
    try:
        os.rename(name, _pool_name(token, size), src_dir_fd=shard_fd, dst_dir_fd=tmp_fd)
    except FileNotFoundError:
        raise
    except OSError:
        return False
    return True


def claim(tmp_fd: int, size: int, name: str) -> int | None:
    """An fd open for writing at offset 0 on a pool file of exactly ``size``
    bytes (truncated or extended to it), renamed to ``name`` in ``tmp_fd``,
    that no process has open or mapped; None if the pool has none. The
    file's old bytes are all overwritten by the caller."""
    global _leases_work
    if not _leases_work or size < POOL_MIN:
        return None
    try:
        entries = _entries(tmp_fd)
    except OSError:
        return None
    # the smallest file that holds size bytes, then the largest smaller ones
    bigger = sorted(e for e in entries if e[0] >= size)
    smaller = sorted((e for e in entries if e[0] < size), reverse=True)
    for _pooled, pool_name in (bigger + smaller)[:_TRIES]:
        try:
            os.rename(pool_name, name, src_dir_fd=tmp_fd, dst_dir_fd=tmp_fd)
        except OSError:
            continue  # another process claimed it first
        fd = -1
        try:
            fd = os.open(name, _O_CLAIM, dir_fd=tmp_fd)
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(errno.EINVAL, "not a pool file")
            assert _F_SETLEASE is not None
            try:
                fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                    _leases_work = False  # no lease support: stop pooling
                raise
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
            if st.st_size != size:
                os.ftruncate(fd, size)
        except OSError:
            # open or mapped somewhere (its pages go when that ends), or
            # not a file we made: never rewritten
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp_fd)
            continue
        return fd
    return None
