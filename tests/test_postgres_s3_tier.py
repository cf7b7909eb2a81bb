"""The S3 tier against the real SeaweedFS server."""

from __future__ import annotations

from typing import Any

import pytest

from blobleases import LeaseId
from blobleases.blob_tier import S3Tier
from pg_fixtures import s3_store
from pg_servers import PostgresServer, S3Server

pytestmark = pytest.mark.postgres


def test_an_empty_blob_never_stalls_the_next_request(
    postgres_server: PostgresServer, s3_server: S3Server
) -> None:
    """After an empty PUT on a pooled connection, SeaweedFS left that
    connection's next request unanswered until the read timeout (then the
    retry found the object and got 412): every request here must be
    answered on its first attempt."""
    timeouts: list[str] = []

    def note(caught_exception: Exception | None = None, **_: Any) -> None:
        if caught_exception is not None:
            timeouts.append(repr(caught_exception))

    with s3_store(postgres_server, s3_server, "e", lock_timeout=2) as storage:
        tier = storage.tier
        assert isinstance(tier, S3Tier)
        tier._client().meta.events.register("needs-retry.s3", note)
        stored = []
        for data in (b"", b"x", b"", b"yz"):  # each PUT right after the one before
            lid = LeaseId.new()
            stored.append((storage.store_bytes(data, lid), lid, data))
        for cid, lid, data in stored:
            assert storage.get_data(cid, lid) == data
        assert not timeouts, timeouts
        assert not storage.verify()
