"""dumps and loads: pickles whose large buffers travel by lease.

``dumps`` pickles with protocol 5 and stores every large buffer (numpy,
pandas and pyarrow out-of-band buffers; ``bytes``, ``bytearray`` and
``memoryview`` objects) once as a blob, sending a ticket in its place.
``loads`` maps each blob back as a read-only zero-copy view whose lifetime
keeps the lease and the reader hold behind it.

Payload layout (a protocol 5 pickle of plain values, so loading it runs no
blobleases code before :func:`loads` decides how to load the tickets)::

    ("blobleases.dumps", 1, blobs, (refs, inner))

``blobs`` lists one ``(content id, transfer lease id, pickled ticket)`` per
stored blob; ``inner`` is the pickle of the object. Its out-of-band buffers
are, in order, the blobs numbered in ``refs``; its persistent ids
``("blobleases.buffer", kind, blob number, format, shape)`` stand for the
bytes-like objects.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .content_id import ContentId, check_algorithm
from .errors import BlobLeaseError, ContentNotFound, LeaseExpired
from .lease import BlobLease, ticket_for
from .lease_id import LeaseId
from .registry import get_storage
from .storage import BlobStorage

__all__ = ["dumps", "loads"]

_TAG = "blobleases.dumps"
_VERSION = 1
_PROTOCOL = 5

# Persistent ids: (_PID, kind, blob index, format, shape).
_PID = "blobleases.buffer"


def _default_algorithm(storage: BlobStorage) -> str:
    """The storage's default hash: its ``default_algorithm`` if it names one,
    else sha256."""
    algorithm = getattr(storage, "default_algorithm", None)
    return algorithm if isinstance(algorithm, str) else "sha256"


def _memoryview_from_bytes(data: bytes, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """A small pickled memoryview: read-only, with its format and shape."""
    return _shaped(memoryview(data), fmt, shape)


def _shaped(view: memoryview, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """``view`` (flat bytes) cast back to ``fmt`` and ``shape`` where
    memoryview can (native single formats), else left flat bytes."""
    view = view.toreadonly()
    if fmt == "B" and len(shape) == 1:
        return view
    try:
        shaped: memoryview = view.cast(fmt, shape)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return view
    return shaped


class _Dumper(pickle.Pickler):
    def __init__(
        self,
        file: io.BytesIO,
        store: Callable[[memoryview], int],
        min_size: int,
        refs: list[int],
    ) -> None:
        super().__init__(file, protocol=_PROTOCOL, buffer_callback=self._buffer)
        self._store = store
        self._min_size = min_size
        self._refs = refs
        numpy = sys.modules.get("numpy")
        self._ndarray: Any = getattr(numpy, "ndarray", None)

    def _buffer(self, buffer: pickle.PickleBuffer) -> bool:
        """Out of band (False) when large: stored as a blob."""
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickle says so in band
            return True
        if raw.nbytes < self._min_size:
            return True
        self._refs.append(self._store(raw))
        return False

    def persistent_id(self, obj: Any) -> Any:
        # bytes and bytearray never reach reducer_override; every object
        # reaches persistent_id.
        kind = type(obj)
        if kind is bytes or kind is bytearray:
            if len(obj) < self._min_size:
                return None
            return (_PID, kind.__name__, self._store(memoryview(obj)), "B", (len(obj),))
        if kind is memoryview:
            if obj.nbytes < self._min_size or "O" in obj.format:
                return None
            flat = pickle.PickleBuffer(obj).raw() if obj.c_contiguous else None
            if flat is None:
                flat = memoryview(obj.tobytes())
            return (_PID, "memoryview", self._store(flat), obj.format, obj.shape)
        return None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is memoryview:  # small (large ones are persistent ids)
            if "O" in obj.format:
                return NotImplemented
            return (_memoryview_from_bytes, (obj.tobytes(), obj.format, obj.shape))
        ndarray = self._ndarray
        if (
            ndarray is not None
            and isinstance(obj, ndarray)
            and not obj.flags.c_contiguous
            and not obj.flags.f_contiguous
            and not obj.dtype.hasobject
        ):
            # numpy pickles a strided array in band as bytes, which would
            # then come back as a view; a contiguous copy goes out of band.
            return obj.copy(order="C").__reduce_ex__(_PROTOCOL)
        return NotImplemented


def dumps(
    obj: Any,
    *,
    storage: BlobStorage | None = None,
    min_size: int = 65536,
    algorithm: str | None = None,
) -> bytes:
    """Pickle ``obj`` (protocol 5), storing every buffer of at least
    ``min_size`` bytes once as a blob in ``storage`` (default: the registered
    one) and sending a ticket (``lease.transfer()``) in its place.

    Large buffers are numpy's (any memory order or shape), pandas' and
    pyarrow's out-of-band ``PickleBuffer``s and ``bytes``, ``bytearray`` and
    ``memoryview`` objects themselves; smaller ones, and objects without a
    flat buffer (numpy object arrays), stay in the pickle. Equal buffers are
    stored once. ``algorithm=None`` is the storage's default (sha256 unless
    it names a ``default_algorithm``). If pickling fails, the transfer
    leases made so far are ended: nothing stays stored for this call.
    """
    return dump_payload(obj, storage=storage, min_size=min_size, algorithm=algorithm)


def dump_payload(
    obj: Any,
    *,
    storage: BlobStorage | None,
    min_size: int,
    algorithm: str | None,
    held: list[BlobLease] | None = None,
) -> bytes:
    """:func:`dumps`; with ``held``, also a lease on each blob stored,
    appended to ``held`` for the caller to close (the executor keeps them
    until its next submit). Each blob's transfer lease is then made from
    that lease; without ``held`` the store itself takes the transfer lease
    (one index write per blob)."""
    if storage is None:
        storage = get_storage()
    elif not isinstance(storage, BlobStorage):
        raise TypeError(f"storage must be a BlobStorage or None, not {type(storage).__name__}")
    if isinstance(min_size, bool) or not isinstance(min_size, int):
        raise TypeError(f"min_size must be an int, not {type(min_size).__name__}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, not {min_size}")
    algo = _default_algorithm(storage) if algorithm is None else check_algorithm(algorithm)
    blobs: list[tuple[str, str, bytes]] = []
    index: dict[ContentId, int] = {}
    held_before = 0 if held is None else len(held)
    ttl = storage.policies.transfer_ttl

    def store(raw: memoryview) -> int:
        lid = LeaseId.new()
        if held is None:  # stored under its transfer lease at once
            expires_at = time.time() + ttl  # no later than the lease's own expiry
            cid = _store_buffer(storage, raw, algo, lid, ttl=ttl, detached=True)
            known = index.get(cid)
            if known is not None:
                storage.advise_lease_dropped(lid, cid)
                return known
            ticket = ticket_for(storage, cid, raw.nbytes, lid, expires_at)
        else:
            cid = _store_buffer(storage, raw, algo, lid)
            lease = BlobLease(storage, cid, lid, raw.nbytes)
            known = index.get(cid)
            if known is not None:
                lease.close()
                return known
            try:
                ticket = lease.transfer()
            except BaseException:
                lease.close()
                raise
            held.append(lease)
        index[cid] = len(blobs)
        blobs.append((str(cid), ticket.transfer_lease_id, pickle.dumps(ticket)))
        return len(blobs) - 1

    refs: list[int] = []
    out = io.BytesIO()
    dumper = _Dumper(out, store, min_size, refs)
    try:
        dumper.dump(obj)
        # The dumper is in a reference cycle (its buffer callback) that only
        # the cyclic collector frees: its memo must not keep obj alive.
        dumper.clear_memo()
        return pickle.dumps((_TAG, _VERSION, blobs, (refs, out.getvalue())), protocol=_PROTOCOL)
    except BaseException:
        dumper.clear_memo()
        # Nobody will load these tickets: end their transfer leases now.
        for cid_text, transfer_text, _ticket in blobs:
            storage.advise_lease_dropped(LeaseId.parse(transfer_text), ContentId.parse(cid_text))
        if held is not None:
            for lease in held[held_before:]:
                lease.close()
            del held[held_before:]
        raise


# The buffers stored last, by (exporting object's id, size, algorithm, store
# url, first and last bytes): a hint that the same buffer is being sent again (the same array to
# task after task). A hinted buffer is hashed first and stored under its id,
# so content still present is never written again; the hash, not the hint,
# decides (a changed buffer, or a reused id, is stored as usual).
_RECENT: OrderedDict[tuple[int, int, str, str, bytes], ContentId] = OrderedDict()
_RECENT_MAX = 64
_RECENT_LOCK = threading.Lock()


def _reinit_recent_lock() -> None:
    global _RECENT_LOCK
    _RECENT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reinit_recent_lock)


def _ends(raw: memoryview) -> bytes:
    flat = raw if raw.format == "B" and raw.ndim == 1 else raw.cast("B")
    return bytes(flat[:32]) + bytes(flat[-32:])


def _store_buffer(
    storage: BlobStorage,
    raw: memoryview,
    algorithm: str,
    lid: LeaseId,
    *,
    ttl: float | None = None,
    detached: bool = False,
) -> ContentId:
    """Store ``raw`` in ``storage`` under the lease ``lid``; its id. A buffer
    sent again is hashed first, and not written again if its content is
    present."""
    # (the ends of the bytes too: a fresh buffer that reuses a freed
    # object's id is then rarely mistaken for a repeat)
    key = (id(raw.obj), raw.nbytes, algorithm, storage.url, _ends(raw))
    with _RECENT_LOCK:
        hinted = key in _RECENT
    if hinted:
        cid = ContentId.for_bytes(raw, algorithm)
        # present: a dedup hit, nothing written
        storage.store(cid, raw, lid, ttl=ttl, detached=detached)
    else:
        cid = storage.store_bytes(raw, lid, algorithm=algorithm, ttl=ttl, detached=detached)
    with _RECENT_LOCK:
        _RECENT[key] = cid
        _RECENT.move_to_end(key)
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)
    return cid


def loads(payload: bytes, *, storage: BlobStorage | None = None) -> Any:
    """Rebuild an object pickled by :func:`dumps`, in any process that can
    open its store.

    Each large buffer comes back as a read-only zero-copy view of its blob
    (numpy arrays keep dtype, shape and order, with ``flags.writeable``
    False; ``bytes``, ``bytearray`` and ``memoryview`` objects come back as
    read-only memoryviews). The lease and reader hold behind a blob last as
    long as some view of it lives (an array, a slice, a memoryview), then
    end by themselves. The tickets load into ``storage`` if given, else into
    the store each names (the registered one, or opened by url). Tickets
    are single-use; LeaseExpired if a blob's content is gone.
    """
    if storage is not None and not isinstance(storage, BlobStorage):
        raise TypeError(f"storage must be a BlobStorage or None, not {type(storage).__name__}")
    try:
        tag, version, blobs, (refs, inner) = pickle.loads(payload)
    except Exception as exc:
        raise ValueError("payload is not a pickle made by blobleases.dumps") from exc
    if tag != _TAG or version != _VERSION:
        raise ValueError(f"payload is not a pickle made by blobleases.dumps ({tag!r} {version!r})")
    views: list[memoryview] = []
    try:
        for entry in blobs:
            views.append(_load_view(entry, storage))
    except BaseException:
        for view in views:  # their exporters go now: so do their holds
            view.release()
        views.clear()
        raise

    return _Loader(inner, views, refs).load()


class _Loader(pickle.Unpickler):
    def __init__(self, inner: bytes, views: list[memoryview], refs: list[int]) -> None:
        super().__init__(io.BytesIO(inner), buffers=[views[n] for n in refs])
        self._views = views

    def persistent_load(self, pid: Any) -> memoryview:
        tag, _kind, number, fmt, shape = pid
        if tag != _PID:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return _shaped(self._views[number], fmt, tuple(shape))


def _load_view(entry: tuple[str, str, bytes], storage: BlobStorage | None) -> memoryview:
    """A view of a payload's blob that keeps a lease and a reader hold on it
    (LeaseExpired if gone). A DirectoryStorage takes over the transfer
    lease and opens the reader in one index transaction, and ends the two
    in one."""
    fast = None
    if storage is not None and not getattr(storage, "read_only", True):
        fast = getattr(storage, "_take_over_reader", None)
    if fast is None:
        lease = _lease(entry, storage)
        try:
            return _view(lease)
        except BaseException:
            lease.close()
            raise
    cid_text, transfer_text, _ticket = entry
    reader = fast(ContentId.parse(cid_text), LeaseId.parse(transfer_text), LeaseId.new())
    if reader is None:
        raise LeaseExpired(_gone(cid_text))
    with reader:
        view: memoryview = reader.getbuffer()
    return view


def _gone(cid_text: str) -> str:
    return (
        f"content {cid_text} of the payload is gone (its ticket expired, or the content "
        "was freed or evicted)"
    )


def _lease(entry: tuple[str, str, bytes], storage: BlobStorage | None) -> BlobLease:
    """The lease a payload's blob entry loads to (LeaseExpired if gone)."""
    cid_text, transfer_text, ticket = entry
    try:
        if storage is None:
            lease = pickle.loads(ticket)
            if not isinstance(lease, BlobLease):
                raise ValueError("payload holds a ticket that is not a lease")
            # Tickets are single-use: end the transfer lease now (a no-op
            # where loading the ticket ended it).
            with contextlib.suppress(BlobLeaseError):
                lease.storage.advise_lease_dropped(
                    LeaseId.parse(transfer_text), ContentId.parse(cid_text)
                )
            return lease
        # Like loading the ticket: a new lease takes over the transfer lease.
        cid = ContentId.parse(cid_text)
        lid = LeaseId.new()
        size = storage.take_over_lease(cid, LeaseId.parse(transfer_text), lid)
        if size is None:
            raise ContentNotFound(cid)
        return BlobLease(storage, cid, lid, size)
    except ContentNotFound as exc:
        raise LeaseExpired(_gone(cid_text)) from exc


def _view(lease: BlobLease) -> memoryview:
    """A read-only view of the whole blob whose exporter, while it lives,
    keeps both the reader's hold and ``lease`` (LeaseExpired if gone)."""
    with lease.get_reader() as reader:
        view = reader.getbuffer()
    weakref.finalize(view.obj, _end_lease, lease)
    return view


def _end_lease(lease: BlobLease) -> None:
    # The storage may be closed by now: a shared store reaps the lease.
    with contextlib.suppress(BlobLeaseError):
        lease.close()
