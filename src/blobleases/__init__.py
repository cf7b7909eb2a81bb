"""blobleases: a content-addressed blob store with leases.

Processes store large immutable bytes once, share them by content id and
hold them through leases; bytes live exactly as long as a lease or an open
reader holds them, and the leases of a process that dies are reaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .content_id import ContentId
from .errors import (
    BlobLeaseError,
    ContentNotFound,
    IntegrityError,
    InvalidContentId,
    InvalidLeaseId,
    LeaseExpired,
    StorageAlreadyInitialized,
    StorageError,
    StorageNotInitialized,
    StoreFull,
)
from .executor import LeaseExecutor
from .lease import BlobLease, ByValue, LeaseTicket
from .lease_id import LeaseId
from .manager import BlobManager, get_by_content_id, store, store_file
from .memory import MemoryStorage
from .pickling import dumps, loads
from .policies import Policies
from .reader import BlobReader
from .registry import get_storage, register_storage, unregister_storage
from .reports import (
    BlobInfo,
    CollectReport,
    LeaseInfo,
    ReaderInfo,
    StorageStats,
    VerifyReport,
    WhyReport,
)
from .storage import BlobStorage
from .urls import open_storage, register_backend

if TYPE_CHECKING:
    from .aio import AsyncBlobLease, AsyncBlobManager
    from .directory import DirectoryStorage
    from .redis_storage import RedisStorage

__version__ = "0.1.0"

__all__ = [
    "AsyncBlobLease",
    "AsyncBlobManager",
    "BlobInfo",
    "BlobLease",
    "BlobLeaseError",
    "BlobManager",
    "BlobReader",
    "BlobStorage",
    "ByValue",
    "CollectReport",
    "ContentId",
    "ContentNotFound",
    "DirectoryStorage",
    "IntegrityError",
    "InvalidContentId",
    "InvalidLeaseId",
    "LeaseExecutor",
    "LeaseExpired",
    "LeaseId",
    "LeaseInfo",
    "LeaseTicket",
    "MemoryStorage",
    "Policies",
    "ReaderInfo",
    "RedisStorage",
    "StorageAlreadyInitialized",
    "StorageError",
    "StorageNotInitialized",
    "StorageStats",
    "StoreFull",
    "VerifyReport",
    "WhyReport",
    "__version__",
    "dumps",
    "get_by_content_id",
    "get_storage",
    "loads",
    "open_storage",
    "register_backend",
    "register_storage",
    "store",
    "store_file",
    "unregister_storage",
]


def __getattr__(name: str) -> Any:
    # DirectoryStorage and RedisStorage load on first use: RedisStorage needs
    # the optional redis extra, and neither is needed to import the package.
    # The asyncio handles load on first use too (importing asyncio takes time).
    if name in ("AsyncBlobManager", "AsyncBlobLease"):
        from . import aio

        return getattr(aio, name)
    if name == "DirectoryStorage":
        from .directory import DirectoryStorage

        return DirectoryStorage
    if name == "RedisStorage":
        from .redis_storage import RedisStorage

        return RedisStorage
    raise AttributeError(f"module 'blobleases' has no attribute {name!r}")
