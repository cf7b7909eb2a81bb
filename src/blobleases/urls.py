"""open_storage: one url names one store, for every backend.

``memory://``, ``temp://``, a path or ``file://PATH``, ``shm://NAME``,
``redis://``, ``rediss://``, ``redis+cluster://`` and ``unix://``.

Schemes map to backends through one table, as fsspec's known
implementations do. Third parties add a scheme with
``register_backend(scheme, factory)`` or by declaring an entry point in the
``blobleases.backends`` group (the entry point's name is the scheme, its
object the factory)::

    [project.entry-points."blobleases.backends"]
    s3 = "mypackage.storage:open_s3"

A factory is called as ``factory(url, create=create, **policies)`` with the
whole url and returns a ``BlobStorage``. Schemes are case-insensitive.
Built-in schemes and those registered by ``register_backend`` take
precedence over entry points; entry points are read once, when a scheme is
not in the table.
"""

from __future__ import annotations

import re
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from .storage import BlobStorage

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendFactory",
    "known_schemes",
    "open_storage",
    "register_backend",
]

ENTRY_POINT_GROUP = "blobleases.backends"

_SHM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# RFC 3986 section 3.1, lower-cased (schemes are case-insensitive).
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
# The table key of a url with no scheme: a bare path (not a valid scheme, so
# no url can name it and no one can register it).
_PATH = ""


class BackendFactory(Protocol):
    """What a scheme maps to: opens the store ``url`` names."""

    def __call__(self, url: str, /, *, create: bool, **policies: Any) -> BlobStorage: ...


_lock = threading.Lock()
# scheme -> factory, or the entry point that gives it (loaded on first use).
_backends: dict[str, BackendFactory | EntryPoint] = {}
_entry_points_read = False


def without_password(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: what messages and
    reprs show of a store's url."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def register_backend(scheme: str, factory: BackendFactory, *, clobber: bool = False) -> None:
    """Make ``open_storage`` open ``scheme://...`` urls with ``factory``.

    ``factory(url, create=create, **policies)`` gets the whole url. A scheme
    that is taken (built-in, registered or from an entry point) raises
    ``ValueError`` unless ``clobber=True``, which replaces it."""
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a str, not {type(scheme).__name__}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, not {type(factory).__name__}")
    if not isinstance(clobber, bool):
        raise TypeError(f"clobber must be a bool, not {type(clobber).__name__}")
    key = scheme.lower()
    if not _SCHEME.fullmatch(key):
        raise ValueError(
            f"scheme {scheme!r} is not a url scheme (a letter, then letters, digits, '+', "
            "'-' or '.'; without '://')"
        )
    _read_entry_points()
    with _lock:
        if key in _backends and not clobber:
            raise ValueError(
                f"scheme {key!r} is already registered (pass clobber=True to replace it)"
            )
        _backends[key] = factory


def known_schemes() -> list[str]:
    """The schemes ``open_storage`` opens, sorted (a bare path needs none)."""
    _read_entry_points()
    with _lock:
        return sorted(key for key in _backends if key != _PATH)


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
    scheme = url.split("://", 1)[0].lower() if "://" in url else _PATH
    return _factory(url, scheme)(url, create=create, **policies)


def _factory(url: str, scheme: str) -> BackendFactory:
    with _lock:
        found = _backends.get(scheme)
    if found is None and not _entry_points_read:
        _read_entry_points()
        with _lock:
            found = _backends.get(scheme)
    if found is None:
        known = known_schemes()
        raise ValueError(
            f"url {url!r}: unknown scheme {scheme!r} (known: {', '.join(known)}; "
            "or a path without a scheme)"
        )
    if isinstance(found, EntryPoint):
        try:
            loaded = found.load()
        except Exception as exc:
            raise ValueError(
                f"url {url!r}: the {ENTRY_POINT_GROUP} entry point {found.name!r} "
                f"({found.value}) failed to load: {exc!r}"
            ) from exc
        if not callable(loaded):
            raise ValueError(
                f"url {url!r}: the {ENTRY_POINT_GROUP} entry point {found.name!r} "
                f"({found.value}) is not callable"
            )
        factory: BackendFactory = loaded
        with _lock:
            if _backends.get(scheme) is found:
                _backends[scheme] = factory
        return factory
    return found


def _read_entry_points() -> None:
    """Add the ``blobleases.backends`` entry points to the table, once.

    One whose name is not a scheme, or whose scheme is taken, is passed over."""
    global _entry_points_read
    if _entry_points_read:
        return
    found = entry_points(group=ENTRY_POINT_GROUP)
    with _lock:
        if _entry_points_read:
            return
        for entry in found:
            key = entry.name.lower()
            if _SCHEME.fullmatch(key) and key not in _backends:
                _backends[key] = entry
        _entry_points_read = True


def _open_memory(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    if url.lower() != "memory://":
        raise ValueError(f"url {url!r}: a memory store takes no path (use 'memory://')")
    from .memory import MemoryStorage

    return MemoryStorage(**policies)


def _open_temp(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    if url.lower() != "temp://":
        raise ValueError(f"url {url!r}: a temporary store takes no path (use 'temp://')")
    from .directory import DirectoryStorage

    return DirectoryStorage.temporary(**policies)


def _open_shm(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    name = url[len("shm://") :]
    if not _SHM_NAME.fullmatch(name):
        raise ValueError(f"url {url!r}: shm:// takes a name of letters, digits, '.', '_' and '-'")
    from .directory import DirectoryStorage

    return DirectoryStorage.shared_memory(name, create=create, **policies)


def _open_file(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"url {url!r}: file urls must name a local path (file:///path)")
    path = unquote(parts.path, errors="surrogateescape")
    if not path:
        raise ValueError(f"url {url!r} names no path")
    from .directory import DirectoryStorage

    return DirectoryStorage(path, create=create, **policies)


def _open_path(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    from .directory import DirectoryStorage

    return DirectoryStorage(url, create=create, **policies)


def _open_redis(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    from .redis_storage import RedisStorage

    return RedisStorage(url, **policies)


def _open_postgres(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
    from .postgres_storage import open_postgres

    return open_postgres(url, create=create, **policies)


_BUILT_IN: dict[str, BackendFactory] = {
    "memory": _open_memory,
    "temp": _open_temp,
    "shm": _open_shm,
    "file": _open_file,
    _PATH: _open_path,
    "redis": _open_redis,
    "rediss": _open_redis,
    "redis+cluster": _open_redis,
    "unix": _open_redis,
    "postgresql": _open_postgres,
    "postgres": _open_postgres,
}
_backends.update(_BUILT_IN)
