"""open_storage's scheme table: register_backend and the blobleases.backends entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import blobleases
from blobleases import BlobStorage, MemoryStorage, open_storage, register_backend, urls

SRC = str(Path(blobleases.__file__).resolve().parent.parent)


@pytest.fixture(autouse=True)
def _private_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test registers into a copy, so no scheme leaks into other tests.
    monkeypatch.setattr(urls, "_backends", dict(urls._backends))


def test_built_in_schemes_are_in_the_table() -> None:
    assert set(urls.known_schemes()) >= {
        "memory",
        "temp",
        "file",
        "shm",
        "redis",
        "rediss",
        "redis+cluster",
        "unix",
    }
    with open_storage("memory://", max_bytes=10) as storage:
        assert isinstance(storage, MemoryStorage) and storage.policies.max_bytes == 10


def test_registered_factory_gets_url_create_and_policies() -> None:
    calls: list[tuple[str, bool, dict[str, Any]]] = []

    def factory(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
        calls.append((url, create, policies))
        return MemoryStorage(**policies)

    register_backend("My-Store", factory)
    assert "my-store" in urls.known_schemes()
    with open_storage("MY-STORE://bucket/x", create=False, retain_bytes=5) as storage:
        assert isinstance(storage, MemoryStorage) and storage.policies.retain_bytes == 5
    assert calls == [("MY-STORE://bucket/x", False, {"retain_bytes": 5})]


def test_taken_scheme_needs_clobber() -> None:
    def factory(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
        return MemoryStorage(max_bytes=123)

    with pytest.raises(ValueError, match=r"'memory' is already registered.*clobber=True"):
        register_backend("memory", factory)
    with open_storage("memory://") as storage:
        assert storage.policies.max_bytes is None
    register_backend("MEMORY", factory, clobber=True)
    with open_storage("memory://anything") as storage:
        assert storage.policies.max_bytes == 123
    register_backend("mine", factory)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("mine", factory)


def test_bad_arguments_name_the_argument() -> None:
    def factory(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
        return MemoryStorage()

    with pytest.raises(TypeError, match="scheme must be a str"):
        register_backend(b"x", factory)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory must be callable"):
        register_backend("x", "not a factory")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clobber must be a bool"):
        register_backend("x", factory, clobber=1)  # type: ignore[arg-type]
    for bad in ("", "x://", "1abc", "a b", "a/b"):
        with pytest.raises(ValueError, match="is not a url scheme"):
            register_backend(bad, factory)
    assert "x" not in urls.known_schemes()


def test_unknown_scheme_lists_the_known_ones() -> None:
    def factory(url: str, /, *, create: bool, **policies: Any) -> BlobStorage:
        return MemoryStorage()

    register_backend("zzz-extra", factory)
    with pytest.raises(ValueError, match="unknown scheme 'ftp'") as raised:
        open_storage("ftp://host/x")
    message = str(raised.value)
    for scheme in ("memory", "temp", "file", "shm", "redis", "rediss", "redis+cluster", "unix"):
        assert f"{scheme}," in message or f"{scheme};" in message
    assert "zzz-extra" in message and "a path" in message


def _install_entry_points(root: Path, entries: str) -> None:
    """A distribution on ``root`` (put on sys.path) declaring ``entries``."""
    dist = root / "blobleases_test_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: blobleases-test-backend\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text("[blobleases.backends]\n" + entries)
    (root / "blobleases_test_backend.py").write_text(
        textwrap.dedent(
            """
            from blobleases import MemoryStorage

            OPENED = []

            def open_store(url, *, create, **policies):
                OPENED.append(url)
                return MemoryStorage(**policies)

            def hijack(url, *, create, **policies):
                raise AssertionError("an entry point must not replace a built-in scheme")

            NOT_CALLABLE = 42
            """
        )
    )


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import blobleases
from blobleases import open_storage, register_backend, urls
import blobleases_test_backend as backend

out = {}
out["known"] = urls.known_schemes()
with open_storage("viaentry://some/where", max_bytes=7) as storage:
    out["max_bytes"] = storage.policies.max_bytes
out["opened"] = backend.OPENED
with open_storage("memory://") as storage:
    out["memory"] = type(storage).__name__
for url in ("broken://x", "notcallable://x"):
    try:
        open_storage(url)
    except ValueError as exc:
        out[url] = str(exc)
try:
    register_backend("viaentry", backend.open_store)
except ValueError as exc:
    out["taken"] = str(exc)
print(json.dumps(out))
"""


def test_entry_point_group_adds_schemes(tmp_path: Path) -> None:
    _install_entry_points(
        tmp_path,
        "viaentry = blobleases_test_backend:open_store\n"
        "memory = blobleases_test_backend:hijack\n"
        "broken = blobleases_test_backend_missing:open_store\n"
        "notcallable = blobleases_test_backend:NOT_CALLABLE\n",
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "viaentry" in out["known"] and "broken" in out["known"]
    assert out["max_bytes"] == 7
    assert out["opened"] == ["viaentry://some/where"]
    assert out["memory"] == "MemoryStorage"
    assert "entry point 'broken'" in out["broken://x"]
    assert "blobleases_test_backend_missing" in out["broken://x"]
    assert "entry point 'notcallable'" in out["notcallable://x"]
    assert "not callable" in out["notcallable://x"]
    assert "'viaentry' is already registered" in out["taken"]
