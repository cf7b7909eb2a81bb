"""Finding the backends under test (each may not exist yet) and cleaning up after them."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from blobleases import BlobStorage

from .harness import Unavailable

__all__ = [
    "directory_storage",
    "redis_server",
    "redis_storage_class",
    "remove_store",
    "shm_store",
]


def directory_storage() -> Any:
    """The DirectoryStorage class, or Unavailable saying why not."""
    try:
        from blobleases.directory import DirectoryStorage
    except ImportError as exc:
        raise Unavailable(f"DirectoryStorage is not available ({exc})") from exc
    return DirectoryStorage


def redis_storage_class() -> Any:
    """The RedisStorage class, or Unavailable saying why not."""
    try:
        from blobleases.redis_storage import RedisStorage
    except ImportError as exc:
        raise Unavailable(f"RedisStorage is not available ({exc})") from exc
    return RedisStorage


def store_root(storage: BlobStorage) -> str | None:
    """The directory a DirectoryStorage lives in, if it says."""
    for attr in ("root", "path", "_root", "_path"):
        value = getattr(storage, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def shm_store(name: str, **policies: Any) -> BlobStorage:
    """A DirectoryStorage on tmpfs (``shm://NAME``)."""
    ds = directory_storage()
    storage: BlobStorage = ds.shared_memory(name, **policies)
    return storage


def remove_store(storage: BlobStorage | None, fallback: str | None = None) -> None:
    """Close a scratch store and remove its directory (or ``fallback``)."""
    root = (store_root(storage) if storage is not None else None) or fallback
    if storage is not None:
        with contextlib.suppress(Exception):
            storage.close()
    if root and os.path.isdir(root):
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(binary: str, workdir: str) -> Iterator[str]:
    """Start ``redis-server`` on a free loopback port; yield its url; stop it."""
    exe = shutil.which(binary)
    if exe is None:
        raise Unavailable(f"{binary} not found on PATH (install redis-server)")
    try:
        import redis
    except ImportError as exc:
        raise Unavailable("redis-py is not installed (pip install redis)") from exc
    os.makedirs(workdir, exist_ok=True)
    last_error: Exception | None = None
    for _attempt in range(3):
        port = _free_port()
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError as exc:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        last_error = exc
                        raise
                    time.sleep(0.05)
            client.close()
        except redis.ConnectionError:
            proc.kill()
            proc.wait()
            continue
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    raise Unavailable(f"redis-server did not start: {last_error}")
