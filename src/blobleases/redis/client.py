"""Talking to the server: urls, and redis-py errors as blobleases errors."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import SplitResult, urlunsplit

import redis.exceptions

from ..errors import StorageError, StoreFull

__all__ = ["memory_limit", "storage_error_context", "storage_errors", "unsplit"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def unsplit(parts: SplitResult) -> str:
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


@contextlib.contextmanager
def storage_error_context(storage: Any = None, *, storing: bool = False) -> Iterator[None]:
    """Turn redis-py failures into StorageError, chained; a write refused by a
    server at maxmemory into StoreFull when ``storing``, else StorageError,
    naming the server's maxmemory (read from ``storage``'s server)."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        message = f"the redis server is full ({memory_limit(storage)}): {exc}"
        if storing:
            raise StoreFull(message) from exc
        raise StorageError(message) from exc
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise StorageError(f"redis: {type(exc).__name__}: {exc}") from exc


def memory_limit(storage: Any) -> str:
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


def storage_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``func`` in :func:`storage_error_context`; a method that stores
    (``_store``, ``_store_file``) gets StoreFull from a full server."""
    storing = func.__name__ in ("_store", "_store_file")

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with storage_error_context(args[0] if args else None, storing=storing):
            return func(*args, **kwargs)

    return wrapper
