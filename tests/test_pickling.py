"""dumps and loads (SPEC section 7): large buffers travel by lease and come
back as read-only zero-copy views whose lifetime keeps their lease and
reader hold, in this process, in a spawned one, and after a SIGKILL."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blobleases
from blobleases import (
    BlobManager,
    BlobStorage,
    DirectoryStorage,
    LeaseExpired,
    MemoryStorage,
    dumps,
    loads,
)
from blobleases.urls import open_storage

np = pytest.importorskip("numpy")

BACKENDS = ["memory", "directory", "shm", "redis"]
SHARED = ["directory", "shm", "redis"]


def _make(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStorage:
    if kind == "memory":
        return MemoryStorage()
    if kind == "directory":
        return DirectoryStorage(tmp_path / "store")
    if kind == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this machine")
        return open_storage(f"shm://test-pickling-{uuid.uuid4().hex[:12]}")
    from blobleases.redis_storage import RedisStorage

    server = request.getfixturevalue("redis_server")
    return RedisStorage(server.url, namespace=f"t-{uuid.uuid4().hex[:12]}")


def _closed(made: BlobStorage, kind: str) -> None:
    root = getattr(made, "root", None)
    made.close()
    if kind == "shm" and root is not None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStorage]:
    made = _make(request.param, request, tmp_path)
    try:
        yield made
    finally:
        _closed(made, request.param)


@pytest.fixture(params=SHARED)
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStorage]:
    made = _make(request.param, request, tmp_path)
    try:
        yield made
    finally:
        _closed(made, request.param)


def _arrays() -> dict[str, Any]:
    base = np.arange(60_000, dtype=np.float64).reshape(300, 200)
    return {
        "c": base.copy(),
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "strided": base[::2, ::3],
        "reversed": base[::-1],
        "zero": np.zeros((0, 4)),
        "zero3": np.zeros((5, 0, 3), dtype=np.int16),
        "scalar": np.array(3.5),
        "structured": np.array(
            [(i, i * 0.5, b"ab") for i in range(20_000)],
            dtype=[("i", "<i4"), ("f", ">f8"), ("s", "S2")],
        ),
        "int8_3d": np.arange(4 * 100 * 200, dtype=np.int8).reshape(4, 100, 200),
        "bool": np.ones(100_000, dtype=bool),
        "small": np.arange(10),
    }


def _check_array(got: Any, want: Any, large: bool) -> None:
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    if large:
        assert not got.flags.writeable


def test_numpy_round_trips_in_every_layout(storage: BlobStorage) -> None:
    arrays = _arrays()
    payload = dumps(arrays, storage=storage)
    out = loads(payload, storage=storage)
    assert out.keys() == arrays.keys()
    for name, want in arrays.items():
        _check_array(out[name], want, large=want.nbytes >= 65536)
    # Fortran order and transposition survive as memory order, zero-copy.
    assert out["fortran"].flags.f_contiguous and not out["fortran"].flags.c_contiguous
    assert out["transposed"].flags.f_contiguous
    assert out["small"].flags.writeable  # in band: an ordinary copy


def test_large_buffers_travel_by_lease_small_ones_in_band(storage: BlobStorage) -> None:
    big = np.arange(1 << 16, dtype=np.float64)  # 512 KiB
    payload = dumps({"big": big, "small": np.arange(100)}, storage=storage)
    assert len(payload) < 2000  # the in-band pickle plus a few hundred bytes per blob
    assert storage.stats().blobs == 1
    assert storage.stats().bytes == big.nbytes


def test_min_size_sets_what_travels_by_lease(storage: BlobStorage) -> None:
    arrays = [np.arange(1000), np.arange(2000)]
    dumps(arrays, storage=storage, min_size=10_000)
    assert storage.stats().blobs == 1
    payload = dumps(arrays, storage=storage, min_size=0)
    assert storage.stats().blobs == 2
    assert all(
        np.array_equal(a, b) for a, b in zip(loads(payload, storage=storage), arrays, strict=True)
    )
    with pytest.raises(ValueError, match="min_size"):
        dumps(arrays, storage=storage, min_size=-1)
    with pytest.raises(TypeError, match="min_size"):
        dumps(arrays, storage=storage, min_size=1.5)  # type: ignore[arg-type]


def test_equal_buffers_are_stored_once(storage: BlobStorage) -> None:
    a, b = np.ones(100_000), np.ones(100_000)
    payload = dumps([a, b, a, bytes(a.data), b.T], storage=storage)
    assert storage.stats().blobs == 1
    out = loads(payload, storage=storage)
    assert out[0] is out[2]  # pickle's memo: one object stays one object
    assert all(np.array_equal(x, a) for x in (out[0], out[1], out[4]))
    assert bytes(out[3]) == bytes(a.data)


def test_object_arrays_stay_in_band(storage: BlobStorage) -> None:
    objects = np.array([{"k": 1}, "text", None, 2.5] * 5000, dtype=object)
    payload = dumps(objects, storage=storage)
    assert storage.stats().blobs == 0
    out = loads(payload, storage=storage)
    assert out.dtype == object and list(out) == list(objects)


def test_store_refuses_object_arrays_and_non_contiguous_buffers(storage: BlobStorage) -> None:
    manager = BlobManager(storage)
    with pytest.raises(TypeError, match="object"):
        manager.store(np.array([1, "x"], dtype=object))
    with pytest.raises(TypeError, match="object"):
        manager.store(np.zeros(3, dtype=[("a", "f8"), ("o", "O")]))
    for layout in (np.zeros((40, 40))[:, ::2], np.zeros((40, 40)).T, np.zeros((4, 4), order="F")):
        with pytest.raises(TypeError, match=r"ascontiguousarray.*dumps"):
            manager.store(layout)
    assert storage.stats().blobs == 0
    with manager.store(np.zeros((0, 4))) as lease:
        assert lease.size == 0
    with manager.store(np.zeros(4, dtype=[("Obj", "f8")])) as lease:  # a field name, no objects
        assert lease.size == 32


def test_bytes_bytearray_memoryview(storage: BlobStorage) -> None:
    data = bytes(range(256)) * 1000
    doubles = memoryview(np.arange(20_000, dtype=np.float64))
    grid = memoryview(np.arange(20_000, dtype=np.int32).reshape(100, 200))
    payload = dumps(
        {
            "bytes": data,
            "bytearray": bytearray(data),
            "memoryview": memoryview(data),
            "doubles": doubles,
            "grid": grid,
            "strided": memoryview(np.arange(40_000, dtype=np.float64))[::2],
            "small": b"small",
            "small_array": bytearray(b"xy"),
            "small_view": memoryview(b"abc"),
        },
        storage=storage,
    )
    out = loads(payload, storage=storage)
    for name in ("bytes", "bytearray", "memoryview"):
        view = out[name]
        assert isinstance(view, memoryview) and view.readonly and view == data
    assert out["doubles"].format == "d" and out["doubles"] == doubles
    assert out["grid"].shape == (100, 200) and out["grid"] == grid
    assert out["strided"].tolist() == list(range(0, 40_000, 2))
    assert out["small"] == b"small" and type(out["small"]) is bytes
    assert out["small_array"] == bytearray(b"xy") and type(out["small_array"]) is bytearray
    assert out["small_view"] == b"abc" and out["small_view"].readonly
    assert storage.stats().blobs == 4  # data (three times), doubles, grid, strided


def test_nested_containers(storage: BlobStorage) -> None:
    big = np.arange(100_000, dtype=np.int64)
    obj = {"list": [big, (big[::-1], {"deep": [bytes(70_000)]})], "set": {1, 2}, "n": None}
    out = loads(dumps(obj, storage=storage), storage=storage)
    assert np.array_equal(out["list"][0], big)
    assert np.array_equal(out["list"][1][0], big[::-1])
    assert out["list"][1][1]["deep"][0] == bytes(70_000)
    assert out["set"] == {1, 2} and out["n"] is None


def test_pandas_dataframe(storage: BlobStorage) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {"a": np.arange(100_000, dtype=np.float64), "b": np.arange(100_000), "c": ["x"] * 100_000}
    )
    payload = dumps(frame, storage=storage)
    assert storage.stats().blobs >= 1
    out = loads(payload, storage=storage)
    assert out.equals(frame)
    assert not out["a"].to_numpy().flags.writeable


def test_pyarrow_table(storage: BlobStorage) -> None:
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"a": np.arange(100_000, dtype=np.float64), "b": ["y"] * 100_000})
    payload = dumps(table, storage=storage)
    assert storage.stats().blobs >= 1
    assert loads(payload, storage=storage).equals(table)


def test_loads_of_64_mib_allocates_under_1_mib(storage: BlobStorage) -> None:
    big = np.ones(8 << 20)  # 64 MiB
    payload = dumps(big, storage=storage)
    del big
    gc.collect()
    tracemalloc.start()
    try:
        out = loads(payload, storage=storage)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == 64 << 20 and out[-1] == 1.0 and not out.flags.writeable
    assert peak < 1 << 20, f"loads allocated {peak} bytes"


def test_views_keep_the_content_until_the_last_one_goes(storage: BlobStorage) -> None:
    array = np.arange(1 << 17, dtype=np.float64)
    payload = dumps(array, storage=storage)
    out = loads(payload, storage=storage)
    del array  # the sender let go; its transfer lease ended when loaded
    slice_ = out[10:20]
    view = memoryview(out)[5:6]
    del out
    gc.collect()
    stats = storage.stats()
    assert stats.blobs == 1 and stats.bytes == 1 << 20 and stats.leases == 1
    assert slice_[0] == 10.0
    del slice_
    assert storage.stats().blobs == 1
    view.release()
    del view
    # No gc.collect: the last view going frees the content at once.
    stats = storage.stats()
    assert stats.blobs == 0 and stats.leases == 0 and stats.bytes == 0
    assert not storage.verify()


def test_loads_of_gone_content_raises_lease_expired(storage: BlobStorage) -> None:
    payload = dumps(np.ones(100_000), storage=storage)
    out = loads(payload, storage=storage)
    del out  # the only holder: the content is freed
    assert storage.stats().blobs == 0
    with pytest.raises(LeaseExpired):
        loads(payload, storage=storage)
    assert storage.stats().leases == 0


def test_a_second_load_works_while_the_content_is_held(storage: BlobStorage) -> None:
    payload = dumps(np.ones(100_000), storage=storage)
    first = loads(payload, storage=storage)
    second = loads(payload, storage=storage)
    assert np.array_equal(first, second)
    del first, second
    assert storage.stats().blobs == 0


def test_a_failed_dumps_leaves_nothing(storage: BlobStorage) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        dumps([np.ones(100_000), lambda: None], storage=storage)
    stats = storage.stats()
    assert stats.blobs == 0 and stats.leases == 0


def test_the_registered_storage_is_the_default(storage: BlobStorage) -> None:
    blobleases.register_storage(storage)
    payload = dumps(np.arange(100_000))
    out = loads(payload)
    assert np.array_equal(out, np.arange(100_000)) and not out.flags.writeable
    del out
    assert storage.stats().blobs == 0


def test_bad_payloads_and_arguments(storage: BlobStorage) -> None:
    with pytest.raises(ValueError, match="dumps"):
        loads(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="dumps"):
        loads(b"not a pickle")
    with pytest.raises(TypeError, match="storage"):
        dumps(1, storage="memory://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="algorithm"):
        dumps(1, storage=storage, algorithm="md5")


# -- other processes -----------------------------------------------------------


def _frames() -> dict[str, Any]:
    """A pandas DataFrame and a pyarrow Table, where installed."""
    made: dict[str, Any] = {}
    try:
        import pandas as pd

        made["frame"] = pd.DataFrame({"a": np.arange(50_000.0), "b": ["s"] * 50_000})
    except ImportError:
        pass
    try:
        import pyarrow as pa

        made["table"] = pa.table({"a": np.arange(50_000.0)})
    except ImportError:
        pass
    return made


def _receive(payload: bytes) -> tuple[Any, ...]:
    """In a spawned child: load the payload through the store its tickets name."""
    out = loads(payload)
    array = out["array"]
    frames = _frames()
    return (
        float(array.sum()),
        bool(array.flags.writeable),
        str(array.dtype),
        tuple(array.shape),
        bool(array.flags.f_contiguous),
        bytes(out["bytes"]) == b"q" * 100_000,
        sorted(name for name, value in frames.items() if out[name].equals(value)),
    )


def test_round_trip_in_a_spawned_process(shared: BlobStorage) -> None:
    array = np.asfortranarray(np.arange(200_000, dtype=np.float32).reshape(400, 500))
    frames = _frames()
    payload = dumps({"array": array, "bytes": b"q" * 100_000, **frames}, storage=shared)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_receive, (payload,))
    assert got == (float(array.sum()), False, "float32", (400, 500), True, True, sorted(frames))
    # The child loaded the tickets (single-use) and let go: nothing is left.
    shared.collect()
    assert shared.stats().blobs == 0


def _hold_until_killed(payload: bytes, ready: Any) -> None:
    out = loads(payload)
    ready.put(float(out.sum()))
    signal.pause()


def test_a_sigkilled_receivers_holds_are_reaped(shared: BlobStorage) -> None:
    array = np.arange(1 << 17, dtype=np.float64)
    payload = dumps(array, storage=shared)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_until_killed, args=(payload, ready))
    child.start()
    try:
        assert ready.get(timeout=120) == float(array.sum())
        assert shared.stats().blobs == 1
        assert {info.pid for info in shared.iter_leases()} == {child.pid}
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    shared.collect()
    assert shared.stats().blobs == 0 and shared.stats().leases == 0
    assert not shared.verify()
