"""open_storage: one url names one store, for every backend.

``memory://``, ``temp://``, a path or ``file://PATH``, ``shm://NAME``,
``redis://``, ``rediss://`` and ``redis+cluster://``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from .storage import BlobStorage

__all__ = ["open_storage"]

_SHM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def open_storage(url: str, *, create: bool = True, **policies: Any) -> BlobStorage:
    """Open the store that ``url`` names, with the given policy keywords.

    ``create=False``: a directory store (a path, ``file://``, ``shm://``)
    must exist already (StorageError, with nothing created, if not); the
    other kinds are opened as usual."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    if not isinstance(create, bool):
        raise TypeError(f"create must be a bool, not {type(create).__name__}")
    if not url:
        raise ValueError("url must not be empty")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        if url.lower() != "memory://":
            raise ValueError(f"url {url!r}: a memory store takes no path (use 'memory://')")
        from .memory import MemoryStorage

        return MemoryStorage(**policies)
    if scheme == "temp":
        if url.lower() != "temp://":
            raise ValueError(f"url {url!r}: a temporary store takes no path (use 'temp://')")
        from .directory import DirectoryStorage

        return DirectoryStorage.temporary(**policies)
    if scheme == "shm":
        name = url[len("shm://") :]
        if not _SHM_NAME.fullmatch(name):
            raise ValueError(
                f"url {url!r}: shm:// takes a name of letters, digits, '.', '_' and '-'"
            )
        from .directory import DirectoryStorage

        return DirectoryStorage.shared_memory(name, create=create, **policies)
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"url {url!r}: file urls must name a local path (file:///path)")
        path = unquote(parts.path, errors="surrogateescape")
        if not path:
            raise ValueError(f"url {url!r} names no path")
        from .directory import DirectoryStorage

        return DirectoryStorage(path, create=create, **policies)
    if scheme in ("redis", "rediss", "redis+cluster", "unix"):
        from .redis_storage import RedisStorage

        return RedisStorage(url, **policies)
    if scheme:
        raise ValueError(
            f"url {url!r}: unknown scheme {scheme!r} (expected memory, temp, file, shm, "
            "redis, rediss or redis+cluster)"
        )
    from .directory import DirectoryStorage

    return DirectoryStorage(url, create=create, **policies)
