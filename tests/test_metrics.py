"""Prometheus metrics: the real ``/metrics`` endpoint, scraped over HTTP and
parsed with prometheus_client's parser, before and after real operations
(stores, a dedup hit, errors, an eviction, the reap of a SIGKILLed
process); and ``blobleases metrics --port`` as a real program."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import prometheus_client  # noqa: F401
except ImportError:
    _reason = "prometheus_client is not installed (pip install -e '.[test]')"
    if os.environ.get("CI"):
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)
from prometheus_client.parser import text_string_to_metric_families

from blobleases import (
    BlobManager,
    BlobStorage,
    ContentId,
    ContentNotFound,
    DirectoryStorage,
    LeaseExpired,
    LeaseId,
    MemoryStorage,
    open_storage,
)
from blobleases.metrics import StorageCollector, serve
from test_cli import assert_user_error, cli, ok

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CHILD = r"""
import sys
from blobleases import LeaseId, open_storage
storage = open_storage(sys.argv[1])
storage.store_bytes(bytes.fromhex(sys.argv[2]), LeaseId.new())
print("stored", flush=True)
sys.stdin.read()
"""


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        assert response.status == 200
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "store"))
            out[(sample.name, labels)] = sample.value
    return out


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(params=["memory", "directory", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStorage]:
    policies = {"max_bytes": 4000, "on_full": "evict"}
    if request.param == "memory":
        made: BlobStorage = MemoryStorage(**policies)
    elif request.param == "directory":
        made = DirectoryStorage(tmp_path / "store", **policies)
    else:
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?namespace=metrics-{uuid.uuid4().hex[:12]}"
        made = open_storage(url, create=True, **policies)
    with made:
        yield made


def test_counters_move_with_the_operations(storage: BlobStorage) -> None:
    server, thread, port = serve(storage, 0)
    try:
        before = scrape(port)
        assert before[("blobleases_up", ())] == 1
        manager = BlobManager(storage)
        one = manager.store(b"1" * 1000)
        two = manager.store(b"2" * 1000)
        dup = manager.store(b"1" * 1000)  # a dedup hit
        lid = LeaseId.new()
        with pytest.raises(ContentNotFound):
            storage.lease_by_content(ContentId.for_bytes(b"absent"), lid)
        with pytest.raises(LeaseExpired):
            storage.get_data(one.content_id, lid)
        with pytest.raises(LeaseExpired):
            storage.get_data(two.content_id, lid)
        mid = scrape(port)
        assert delta(before, mid, "blobleases_stores_total") == 3
        assert delta(before, mid, "blobleases_dedup_hits_total") == 1
        assert delta(before, mid, "blobleases_errors_total", kind="ContentNotFound") == 1
        assert delta(before, mid, "blobleases_errors_total", kind="LeaseExpired") == 2
        assert mid[("blobleases_blobs", ())] == 2
        assert mid[("blobleases_bytes", ())] == 2000
        assert mid[("blobleases_leases", ())] == 3
        assert (
            mid[("blobleases_store_dedup_hits", ())]
            - before.get(("blobleases_store_dedup_hits", ()), 0)
            == 1
        )

        # 2000 stored, max_bytes 4000: a 2500-byte blob evicts the least recently used
        two.close()  # unreferenced: deleted now (no retention)
        three = manager.store(b"3" * 2500)
        big = manager.store(b"4" * 1400)  # 2500 + 1000 + 1400 > 4000: evicts
        after = scrape(port)
        assert delta(mid, after, "blobleases_stores_total") == 2
        assert delta(mid, after, "blobleases_evictions_total") == 1
        assert delta(mid, after, "blobleases_bytes_freed_total", how="evict") in (1000, 2500)
        assert delta(mid, after, "blobleases_store_evictions") == 1
        assert after[("blobleases_blobs", ())] == 2
        for lease in (one, dup, three, big):
            lease.close()
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.parametrize("kind", ["directory", "redis"])
def test_collect_of_a_killed_process_is_counted(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "directory":
        url = str(tmp_path / "store")
    else:
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?namespace=metrics-{uuid.uuid4().hex[:12]}"
    payload = os.urandom(3000)
    with open_storage(url, create=True, reap_interval=3600) as storage:
        http, thread, port = serve(storage, 0)
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, url, payload.hex()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "stored"
            child.send_signal(signal.SIGKILL)
            child.wait()
            before = scrape(port)
            assert before[("blobleases_blobs", ())] == 1
            report = storage.collect()
            after = scrape(port)
        finally:
            http.shutdown()
            thread.join()
    assert report.leases_reaped == 1 and report.bytes_freed == 3000
    assert delta(before, after, "blobleases_leases_reaped_total") == 1
    assert delta(before, after, "blobleases_processes_reaped_total") == 1
    assert delta(before, after, "blobleases_blobs_freed_total") == 1
    assert delta(before, after, "blobleases_bytes_freed_total", how="collect") == 3000
    assert after[("blobleases_blobs", ())] == 0


def test_a_store_that_cannot_be_read_is_down() -> None:
    storage = MemoryStorage()
    collector = StorageCollector(storage)
    storage.close()
    families = {f.name: f for f in collector.collect()}
    assert families["blobleases_up"].samples[0].value == 0
    assert "blobleases_blobs" not in families
    with pytest.raises(TypeError, match="storage"):
        StorageCollector("memory://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        serve(MemoryStorage(), 70000)


def test_the_password_of_a_url_is_not_a_label() -> None:
    from blobleases.metrics import _public_url

    assert _public_url("redis://user:secret@host:6379/0") == "redis://user@host:6379/0"
    assert _public_url("redis://:secret@host/0") == "redis://host/0"
    assert _public_url("/data/blobs") == "/data/blobs"


def test_cli_serves_metrics_until_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(cli("put", "-", store=store, input=b"first"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blobleases",
            "--store",
            str(store),
            "--json",
            "metrics",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        port = started["port"]
        assert started["url"] == f"http://127.0.0.1:{port}/metrics"
        first = scrape(port)
        assert first[("blobleases_blobs", ())] == 1 and first[("blobleases_bytes", ())] == 5
        ok(cli("put", "-", store=store, input=b"second"))
        second = scrape(port)
        assert second[("blobleases_blobs", ())] == 2 and second[("blobleases_leases", ())] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert b"Traceback" not in proc.stderr.read()  # type: ignore[union-attr]


def test_cli_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(cli("put", "-", store=store, input=b"x"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_user_error(cli("metrics", "--port", str(port), store=store), str(port))
    proc = cli("metrics", "--port", "70000", store=store)
    assert proc.returncode == 2 and b"--port" in proc.stderr
