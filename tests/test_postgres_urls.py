"""open_storage('postgresql://...?blobs=...') and PostgresStorage's
arguments: bad input gets a clear error naming the argument, before any
connection is made."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from blobleases import open_storage
from blobleases.postgres_storage import PostgresStorage
from pg_servers import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql://u@localhost/db", "blobs"),
        ("postgresql://u@localhost/db?blobs=ftp://x/y", "blobs"),
        ("postgresql://u@localhost/db?blobs=relative/dir", "blobs"),
        ("postgresql://u@localhost/db?blobs=s3://b/p%3Fcolour%3Dred", "colour"),
        ("postgresql://u@localhost/db?blobs=/tmp/x&namespace=bad%20name", "namespace"),
        ("postgresql://u@localhost/db?blobs=/tmp/x&heartbeat_ttl=soon", "heartbeat_ttl"),
    ],
)
def test_bad_urls_name_the_problem(url: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        open_storage(url)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(TypeError, match="dsn"):
        PostgresStorage(5, blobs="/tmp/x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="blobs"):
        PostgresStorage("postgresql://u@h/db", blobs=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host_id"):
        PostgresStorage("postgresql://u@h/db", blobs="/tmp/x", host_id="a/b")
    with pytest.raises(ValueError, match="heartbeat_ttl"):
        PostgresStorage("postgresql://u@h/db", blobs="/tmp/x", heartbeat_ttl=0)
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStorage("postgresql://u@h/db", blobs="/tmp/x", pool_size=0)


def test_url_round_trip_keeps_namespace_and_heartbeat(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    namespace = f"u-{uuid.uuid4().hex[:8]}"
    blobs = str(tmp_path / "blobs")
    with PostgresStorage(
        postgres_server.dsn, blobs=blobs, namespace=namespace, heartbeat_ttl=7.5
    ) as storage:
        with open_storage(storage.url) as again:
            assert isinstance(again, PostgresStorage)
            assert again.url == storage.url
            assert again.namespace == namespace
            assert again.tier.url == blobs
        assert "7.5" in storage.url and namespace in storage.url
