"""The one process-wide registry: the registered storage, and stores opened
by url when a lease arrives in a process that registered nothing."""

from __future__ import annotations

import os
import threading

from .errors import StorageAlreadyInitialized, StorageNotInitialized
from .storage import BlobStorage

__all__ = [
    "close_opened_stores",
    "get_storage",
    "register_storage",
    "storage_for_url",
    "unregister_storage",
]


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registered: BlobStorage | None = None
        self.opened: dict[str, BlobStorage] = {}

    def reinit_lock_after_fork(self) -> None:
        self.lock = threading.Lock()


_REGISTRY = _Registry()
os.register_at_fork(after_in_child=_REGISTRY.reinit_lock_after_fork)


def register_storage(storage: BlobStorage) -> None:
    """Make ``storage`` the storage that ``BlobManager()`` and the module-level
    functions use. Registering the same object again is a no-op; another one
    raises StorageAlreadyInitialized. A forked child inherits the registration."""
    if not isinstance(storage, BlobStorage):
        raise TypeError(f"storage must be a BlobStorage, not {type(storage).__name__}")
    with _REGISTRY.lock:
        current = _REGISTRY.registered
        if current is storage:
            return
        if current is not None:
            raise StorageAlreadyInitialized(f"a storage is already registered: {current.url}")
        _REGISTRY.registered = storage


def unregister_storage() -> BlobStorage | None:
    """Forget the registered storage (without closing it) and return it."""
    with _REGISTRY.lock:
        current, _REGISTRY.registered = _REGISTRY.registered, None
        return current


def close_opened_stores() -> None:
    """Close and forget the stores opened for unpickled leases (not the
    registered one, unless it was opened that way)."""
    with _REGISTRY.lock:
        opened = list(_REGISTRY.opened.values())
        _REGISTRY.opened.clear()
        if _REGISTRY.registered in opened:
            _REGISTRY.registered = None
    for storage in opened:
        storage.close()


def get_storage() -> BlobStorage:
    """The registered storage, else StorageNotInitialized."""
    current = _REGISTRY.registered
    if current is None:
        raise StorageNotInitialized(
            "no storage is registered: call blobleases.register_storage(...) first"
        )
    return current


def storage_for_url(url: str | None) -> BlobStorage:
    """The storage a lease pickled with ``url`` loads into: the registered one
    when it has that url (or the url is None), else the store at ``url``,
    opened once per process (and registered if nothing is)."""
    if url is None:
        return get_storage()
    with _REGISTRY.lock:
        current = _REGISTRY.registered
        if current is not None and current.url == url:
            return current
        cached = _REGISTRY.opened.get(url)
        if cached is not None:
            return cached
        from .urls import open_storage

        opened = open_storage(url, create=False)  # a ticket names a store that exists
        _REGISTRY.opened[url] = opened
        if current is None:
            _REGISTRY.registered = opened
        return opened
