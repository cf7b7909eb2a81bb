"""Prometheus metrics of a storage (SPEC section 9): ``pip install
'blobleases[metrics]'``.

:class:`StorageCollector` is a ``prometheus_client`` collector over any
:class:`~blobleases.storage.BlobStorage`. At each scrape it reports

* the store's figures, as gauges, whoever made them (``stats()``):
  ``blobleases_blobs``, ``blobleases_bytes``, ``blobleases_leases``,
  ``blobleases_readers``, ``blobleases_processes``,
  ``blobleases_retained_blobs``, ``blobleases_retained_bytes``,
  ``blobleases_store_dedup_hits``, ``blobleases_store_evictions`` and
  ``blobleases_store_evicted_bytes``, and ``blobleases_up`` (0 when the
  store could not be read: the gauges are then left out);
* what this process did through that storage handle, as counters
  (:meth:`~blobleases.storage.BlobStorage.operation_counts`):
  ``blobleases_stores_total``, ``blobleases_dedup_hits_total``,
  ``blobleases_evictions_total``, ``blobleases_leases_reaped_total``,
  ``blobleases_readers_reaped_total``, ``blobleases_processes_reaped_total``,
  ``blobleases_blobs_freed_total``, ``blobleases_bytes_freed_total`` (label
  ``how``: ``collect`` or ``evict``) and ``blobleases_errors_total`` (label
  ``kind``: the error's class name, e.g. ``LeaseExpired``).

Every metric has the label ``store``: the storage's url without a password.

>>> from prometheus_client import REGISTRY
>>> REGISTRY.register(StorageCollector(storage))  # doctest: +SKIP

:func:`serve` (and ``blobleases metrics --port N``) serves ``/metrics``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .storage import BlobStorage

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "blobleases.metrics needs prometheus_client: pip install 'blobleases[metrics]'"
    ) from _exc

__all__ = ["DEFAULT_PORT", "StorageCollector", "serve"]

#: The port ``blobleases metrics`` listens on by default.
DEFAULT_PORT = 9464

_GAUGES = (
    ("blobs", "blobs", "Blobs present in the store."),
    ("bytes", "bytes", "Bytes of the blobs present in the store."),
    ("leases", "leases", "Leases held on the store."),
    ("readers", "readers", "Open readers on the store."),
    ("processes", "processes", "Live processes holding leases or readers."),
    ("retained_blobs", "retained_blobs", "Unreferenced blobs kept by retention."),
    ("retained_bytes", "retained_bytes", "Bytes of the blobs kept by retention."),
    ("dedup_hits", "store_dedup_hits", "Stores (by any process) that found their content present."),
    ("evictions", "store_evictions", "Blobs evicted (by any process) to make room."),
    ("evicted_bytes", "store_evicted_bytes", "Bytes evicted (by any process) to make room."),
)

_COUNTERS = (
    ("stores", "stores", "Stores this process made (store, store_bytes, store_file)."),
    ("dedup_hits", "dedup_hits", "Stores of this process that found their content present."),
    ("evictions", "evictions", "Blobs this process evicted to make room."),
    (
        "leases_reaped",
        "leases_reaped",
        "Leases of dead processes or past their ttl reaped by collect.",
    ),
    ("readers_reaped", "readers_reaped", "Reader holds of dead processes reaped by collect."),
    ("processes_reaped", "processes_reaped", "Dead processes whose holds collect reaped."),
    ("blobs_freed", "blobs_freed", "Blobs this process's collect calls deleted."),
)


def _public_url(url: str) -> str:
    """``url`` without a password (a label is public)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))


class StorageCollector(Collector):
    """The metrics of one storage handle (see the module docstring).
    ``namespace`` prefixes every metric name."""

    def __init__(self, storage: BlobStorage, *, namespace: str = "blobleases") -> None:
        if not isinstance(storage, BlobStorage):
            raise TypeError(f"storage must be a BlobStorage, not {type(storage).__name__}")
        if not isinstance(namespace, str) or not namespace.isidentifier():
            raise ValueError(f"namespace must be an identifier, not {namespace!r}")
        self.storage = storage
        self.namespace = namespace
        self._label = _public_url(storage.url)

    def describe(self) -> Iterator[Metric]:
        """Nothing: the metrics are made at each scrape (so registering does
        not read the store)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        ns, labels = self.namespace, [self._label]
        up = GaugeMetricFamily(f"{ns}_up", "1 when the store could be read.", labels=["store"])
        try:
            stats = self.storage.stats()
        except Exception:
            up.add_metric(labels, 0)
            stats = None
        else:
            up.add_metric(labels, 1)
        yield up
        if stats is not None:
            for field, name, doc in _GAUGES:
                gauge = GaugeMetricFamily(f"{ns}_{name}", doc, labels=["store"])
                gauge.add_metric(labels, getattr(stats, field))
                yield gauge
        counts = self.storage.operation_counts()
        for key, name, doc in _COUNTERS:
            counter = CounterMetricFamily(f"{ns}_{name}", doc, labels=["store"])
            counter.add_metric(labels, counts.get(key, 0))
            yield counter
        freed = CounterMetricFamily(
            f"{ns}_bytes_freed",
            "Bytes this process freed: by collect calls, or by evicting to make room.",
            labels=["store", "how"],
        )
        freed.add_metric([*labels, "collect"], counts.get("bytes_freed", 0))
        freed.add_metric([*labels, "evict"], counts.get("evicted_bytes", 0))
        yield freed
        errors = CounterMetricFamily(
            f"{ns}_errors",
            "Errors the storage raised to this process, by kind.",
            labels=["store", "kind"],
        )
        for key, n in sorted(counts.items()):
            if key.startswith("errors:"):
                errors.add_metric([*labels, key.partition(":")[2]], n)
        yield errors


def serve(
    storage: BlobStorage, port: int = DEFAULT_PORT, addr: str = "127.0.0.1"
) -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` of ``storage`` over HTTP on ``addr:port`` in a
    daemon thread (port 0: a free port). Returns the server, its thread and
    the port it listens on; ``server.shutdown()`` stops it."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, not {port}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StorageCollector(storage))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return server, thread, int(server.server_address[1])
