"""LeaseExecutor (SPEC section 7): tasks travel through dumps/loads, the same
array is stored once, results are zero-copy and outlive shutdown, and the
private store is gone after a SIGKILLed worker, a SIGINTed caller, and (at
the next executor's start) a SIGKILLed caller.

CPython's own process pool tests run with LeaseExecutor substituted, taken
at run time from the interpreter's ``test`` package (Python 3.13 ships
``test.test_concurrent_futures``; 3.11 here does not: then one test skips and
prints why). Every class those modules generate for a process pool (fork,
forkserver and spawn contexts) is subclassed here with
``executor_type = LeaseExecutor``; pytest collects them as unittest cases.
scripts/test.sh runs this file on 3.11, 3.12 and 3.13.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from collections.abc import Iterator
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest

import blobleases
from blobleases import DirectoryStorage, LeaseExecutor, MemoryStorage
from blobleases import executor as executor_module

np = pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def _sum_when(path: str, array: Any, extra: list[int]) -> tuple[float, list[int]]:
    _wait_for(path)
    return float(array.sum()), extra


def _pid_then_sleep(pid_file: str, array: Any) -> float:
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(600)
    return float(array.sum())


def _double(array: Any) -> Any:
    return array * 2


def _info(array: Any) -> tuple[bool, bool, str, tuple[int, ...], float]:
    return (
        array.flags.writeable,
        array.flags.f_contiguous,
        str(array.dtype),
        array.shape,
        float(array.sum()),
    )


def _fails(array: Any) -> None:
    raise ValueError(f"bad array of {array.nbytes} bytes")


def _leftovers(ex: LeaseExecutor) -> list[str]:
    """What is left of ``ex``'s private store: its directory, its lock file,
    and any entry of /dev/shm or the temporary directory naming it."""
    root = str(ex.storage.root)  # type: ignore[attr-defined]
    top = os.path.dirname(root) if root.endswith("/store") else root
    tag = os.path.basename(top).rsplit("-", 1)[1]  # the random part of its name
    found = [p for p in (top, top + ".lock") if os.path.lexists(p)]
    for base in (executor_module._shm_base(), tempfile.gettempdir(), "/dev/shm"):
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        found += [os.path.join(base, e) for e in entries if tag in e]
    return found


@pytest.fixture(params=["shm", "tempdir"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Private stores on /dev/shm, or in the temporary directory (as when
    /dev/shm has no room)."""
    if request.param == "shm":
        if not executor_module._shm_has_room():
            pytest.skip("/dev/shm is missing or has under 1 GiB free on this machine")
    else:
        monkeypatch.setattr(executor_module, "SHM_MIN_FREE", 1 << 62)
    yield request.param


def test_exported_and_a_process_pool() -> None:
    assert blobleases.LeaseExecutor is LeaseExecutor
    from concurrent.futures import Executor, ProcessPoolExecutor

    assert issubclass(LeaseExecutor, Executor)
    assert issubclass(LeaseExecutor, ProcessPoolExecutor)


def test_private_store_where_and_removed_at_shutdown(where: str) -> None:
    ex = LeaseExecutor(2, mp_context=FORK)
    url = ex.storage.url
    assert url.startswith("shm://executor-") if where == "shm" else url.startswith("file://")
    root = Path(ex.storage.root)  # type: ignore[attr-defined]
    if where == "tempdir":
        assert str(root).startswith(tempfile.gettempdir())
    expected = "blake3" if "blake3" in sys.modules or _has_blake3() else "sha256"
    assert ex.storage.default_algorithm == expected  # type: ignore[attr-defined]
    array = np.arange(1 << 16, dtype=np.float64)
    assert ex.submit(_info, array).result()[4] == float(array.sum())
    assert root.exists()
    ex.shutdown()
    assert _leftovers(ex) == []


def _has_blake3() -> bool:
    import importlib.util

    return importlib.util.find_spec("blake3") is not None


def test_round_trip_zero_copy_in_worker_and_caller(where: str) -> None:
    array = np.asfortranarray(np.arange(300_000, dtype=np.float32).reshape(600, 500))
    with LeaseExecutor(2, mp_context=FORK) as ex:
        assert ex.submit(_info, array).result() == (
            False,
            True,
            "float32",
            (600, 500),
            float(array.sum()),
        )
        doubled = ex.submit(_double, array).result()
        assert not doubled.flags.writeable  # a view of the stored result
        np.testing.assert_array_equal(doubled, array * 2)
        assert list(ex.map(_info, [array[:10], array], chunksize=2))[1][4] == float(array.sum())
        with pytest.raises(ValueError, match="bad array of 1200000 bytes"):
            ex.submit(_fails, array).result()
        del doubled
        gc.collect()
        # every ticket and lease of every task has ended: only the last
        # task's argument is held, by the executor, until the next submit
        ex.storage.collect()
        assert ex.storage.stats().blobs == 1
        assert ex.storage.stats().leases == 1
        ex.submit(_info, np.ones(3)).result()
        assert ex.storage.stats().blobs == 0


def test_the_same_array_is_stored_once(tmp_path: Path, where: str) -> None:
    go = str(tmp_path / "go")
    array = np.random.default_rng(1).random(1 << 17)  # 1 MiB
    with LeaseExecutor(2, mp_context=FORK) as ex:
        futures = [ex.submit(_sum_when, go, array, [i]) for i in range(40)]
        stats = ex.storage.stats()
        assert stats.blobs == 1 and stats.bytes == array.nbytes
        assert stats.dedup_hits == 39
        Path(go).touch()
        assert [f.result() for f in futures] == [(float(array.sum()), [i]) for i in range(40)]
        # the same array again, after every task ended: held for the next submit
        assert ex.submit(_sum_when, go, array, []).result()[0] == float(array.sum())
        assert ex.storage.stats().dedup_hits == 40
        ex.submit(_info, np.ones(3)).result()
        assert ex.storage.stats().blobs == 0


def test_an_array_sent_again_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = DirectoryStorage(tmp_path / "store")
    writes: list[int] = []
    write_temp = storage._write_temp

    def counting(data: memoryview) -> str:
        writes.append(data.nbytes)
        return write_temp(data)

    monkeypatch.setattr(storage, "_write_temp", counting)
    array = np.random.default_rng(3).random(1 << 17)  # 1 MiB
    with LeaseExecutor(2, storage=storage, mp_context=FORK) as ex:
        for _ in range(10):  # each task done before the next submit
            assert ex.submit(_info, array).result()[4] == float(array.sum())
        assert writes == [array.nbytes]
        array[0] = 7.0  # changed: the hash, not the hint, decides
        assert ex.submit(_info, array).result()[4] == float(array.sum())
        assert writes == [array.nbytes] * 2
    storage.close()


def test_arguments_are_pickled_at_submit(tmp_path: Path) -> None:
    go = str(tmp_path / "go")
    array = np.ones(1 << 17)
    extra = [1, 2]
    with LeaseExecutor(1, mp_context=FORK) as ex:
        future = ex.submit(_sum_when, go, array, extra)
        array[:] = 5.0
        extra.append(3)
        Path(go).touch()
        assert future.result() == (float(1 << 17), [1, 2])


def test_results_stay_valid_after_shutdown(where: str) -> None:
    array = np.arange(1 << 20, dtype=np.float64)
    ex = LeaseExecutor(2, mp_context=FORK)
    results = list(ex.map(_double, [array, array + 1]))
    ex.shutdown()
    assert _leftovers(ex) == []
    np.testing.assert_array_equal(results[0], array * 2)
    np.testing.assert_array_equal(results[1], (array + 1) * 2)
    del results
    gc.collect()  # ending holds of a removed store raises nothing


def test_a_cancelled_task_ends_its_tickets(tmp_path: Path) -> None:
    go = Path(tmp_path / "go")
    with LeaseExecutor(1, mp_context=FORK) as ex:
        try:
            first = ex.submit(_sum_when, str(go), np.zeros(1 << 17), [])
            while not first.running():
                time.sleep(0.01)
            # (the pool moves one more task to its call queue: that one runs)
            queued = [
                ex.submit(_sum_when, str(go), np.full(1 << 17, float(i)), []) for i in range(1, 6)
            ]
            assert ex.storage.stats().blobs == 6
            assert all(f.cancel() for f in queued[2:])
            # the running and queued tasks' arguments, and the last submitted
            # (held by the executor until the next submit)
            assert ex.storage.stats().blobs == 4
        finally:
            go.touch()
        assert first.result() == (0.0, [])
        assert queued[1].result() == (float(2 << 17), [])
        with pytest.raises(CancelledError):
            queued[2].result()


def test_an_unpicklable_argument_fails_the_future_and_stores_nothing() -> None:
    with LeaseExecutor(1, mp_context=FORK) as ex:
        future = ex.submit(_info, np.zeros(1 << 17), lambda: None)
        with pytest.raises(Exception, match=r"lambda|pickle"):
            future.result()
        assert ex.storage.stats().blobs == 0


def test_a_given_storage_is_used_and_kept(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "store")
    array = np.arange(1 << 16, dtype=np.float64)
    with LeaseExecutor(2, storage=storage, mp_context=FORK) as ex:
        assert ex.storage is storage
        assert ex.submit(_info, array).result()[4] == float(array.sum())
    storage.collect()
    assert storage.stats().blobs == 0  # (shutdown ended the executor's own hold)
    assert not storage.verify()
    storage.close()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"storage .*memory://"):
        LeaseExecutor(storage=MemoryStorage())
    with pytest.raises(TypeError, match="storage"):
        LeaseExecutor(storage="shm://x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="min_size"):
        LeaseExecutor(min_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_size"):
        LeaseExecutor(min_size=-1)
    with pytest.raises(ValueError, match="max_workers"):
        LeaseExecutor(0)


def test_forked_workers_hash_after_the_parent_did() -> None:
    """blake3's own thread pool hangs a forked child that hashes after its
    parent did: the private store's hashing must survive fork."""
    array = np.random.default_rng(2).random(1 << 20)  # hashed in the parent first
    with LeaseExecutor(1, mp_context=FORK) as ex:
        np.testing.assert_array_equal(ex.submit(_double, array).result(timeout=240), array * 2)


def test_a_sigkilled_worker_breaks_the_pool_and_leaves_nothing(tmp_path: Path, where: str) -> None:
    pid_file = str(tmp_path / "pid")
    ex = LeaseExecutor(2, mp_context=FORK)
    future = ex.submit(_pid_then_sleep, pid_file, np.ones(1 << 17))
    _wait_for(pid_file)
    os.kill(int(Path(pid_file).read_text()), signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        future.result()
    with pytest.raises(BrokenProcessPool):
        ex.submit(_info, np.ones(3))
    ex.shutdown()
    assert _leftovers(ex) == []


_CALLER = """
import os, sys, time
import numpy as np
from blobleases import LeaseExecutor
from blobleases import executor as executor_module

def slow(a):
    time.sleep(0.2)
    return a * 2

if __name__ == "__main__":
    if sys.argv[1] == "tempdir":
        executor_module.SHM_MIN_FREE = 1 << 62
    ex = LeaseExecutor(2)
    print(ex.storage.root, flush=True)
    arrays = [np.full(1 << 17, float(i)) for i in range(12)]
    for n, out in enumerate(ex.map(slow, arrays)):
        if n == 1:
            print("mapping", flush=True)
    print("done", flush=True)
"""


def _start_caller(tmp_path: Path, where: str) -> tuple[subprocess.Popen[str], str]:
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(_CALLER))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, str(script), where],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a signal for the caller only, not its workers
    )
    assert proc.stdout is not None
    root = proc.stdout.readline().strip()
    assert root, "the caller printed no store"
    assert proc.stdout.readline().strip() == "mapping"
    return proc, root


def _gone(root: str) -> bool:
    top = os.path.dirname(root) if root.endswith("/store") else root
    lock = os.path.join(top, "owner.lock") if root.endswith("/store") else root + ".lock"
    return not os.path.lexists(top) and not os.path.lexists(lock)


def test_a_sigint_caller_mid_map_leaves_nothing(tmp_path: Path, where: str) -> None:
    proc, root = _start_caller(tmp_path, where)
    assert os.path.isdir(root)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=240)
    assert proc.returncode != 0  # KeyboardInterrupt
    assert _gone(root), os.listdir(os.path.dirname(root))


def test_a_sigkilled_callers_store_is_removed_by_the_next_executor(
    tmp_path: Path, where: str
) -> None:
    proc, root = _start_caller(tmp_path, where)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    for worker in workers:  # orphans would finish their tasks, then wait forever
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    assert os.path.isdir(root) and not _gone(root)
    ex = LeaseExecutor(1)
    try:
        assert _gone(root)
    finally:
        ex.shutdown()


_HOLDER = """
import sys, time
from blobleases import LeaseExecutor
from blobleases import executor as executor_module
if __name__ == "__main__":
    if sys.argv[1] == "tempdir":
        executor_module.SHM_MIN_FREE = 1 << 62
    ex = LeaseExecutor(1)
    print(ex.storage.root, flush=True)
    sys.stdin.read()
    ex.shutdown()
"""


def test_a_live_callers_store_is_kept_by_the_next_executor(tmp_path: Path, where: str) -> None:
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(_HOLDER))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, str(script), where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        root = proc.stdout.readline().strip()
        assert os.path.isdir(root)
        LeaseExecutor(1).shutdown()
        assert os.path.isdir(root) and not _gone(root)
    finally:
        proc.stdin.close()
        proc.wait(timeout=240)
    assert _gone(root)


def test_stores_of_this_process_are_kept(where: str) -> None:
    first = LeaseExecutor(1, mp_context=FORK)
    try:
        second = LeaseExecutor(1, mp_context=FORK)
        second.shutdown()
        assert Path(first.storage.root).is_dir()  # type: ignore[attr-defined]
        assert first.submit(_info, np.ones(1 << 14)).result()[4] == float(1 << 14)
    finally:
        first.shutdown()
    assert _leftovers(first) == []


# -- CPython's own executor tests ----------------------------------------------

_MODULES = [
    "test_process_pool",
    "test_shutdown",
    "test_deadlock",
    "test_init",
    "test_as_completed",
    "test_wait",
]

#: Tests that cannot apply to LeaseExecutor, each with the reason.
EXCLUDED = {
    "test_interpreter_shutdown": (
        "runs a script that imports the executor class by name from concurrent.futures"
    ),
    "test_submit_after_interpreter_shutdown": (
        "runs a script that imports the executor class by name from concurrent.futures"
    ),
    "test_hang_gh83386": (
        "runs a script that imports the executor class by name from concurrent.futures"
    ),
    # Both pass a multiprocessing.Semaphore as an argument, which pickles only
    # while spawning a process: every such task fails in ProcessPoolExecutor
    # too (in its feeder thread, after the workers started); LeaseExecutor
    # pickles at submit, so the future fails at once and no worker starts.
    # The tests count the workers started (ProcessPoolExecutor internals).
    "test_saturation": "counts workers started by tasks whose argument cannot be pickled",
    "test_processes_terminate": "counts workers started by tasks whose argument cannot be pickled",
}

_REASON = ""
_LOADED: list[Any] = []
try:
    for _name in _MODULES:
        _LOADED.append(importlib.import_module(f"test.test_concurrent_futures.{_name}"))
except ImportError as exc:
    _REASON = (
        f"Python {sys.version.split()[0]} does not ship test.test_concurrent_futures ({exc}); "
        "CPython's executor tests run on an interpreter that does (3.13 here)"
    )
    _LOADED = []

_CLASSES: list[str] = []


def _skipped(reason: str) -> Any:
    @unittest.skip(reason)
    def test(self: Any) -> None:  # pragma: no cover - skipped
        pass

    return test


for _module in _LOADED:
    for _attr, _value in sorted(vars(_module).items()):
        if not (
            isinstance(_value, type)
            and issubclass(_value, unittest.TestCase)
            and _attr.startswith("ProcessPool")
            and _attr.endswith("Test")
            and getattr(_value, "ctx", None) in ("fork", "forkserver", "spawn")
        ):
            continue
        _body: dict[str, Any] = {"executor_type": LeaseExecutor, "__module__": __name__}
        for _test, _why in EXCLUDED.items():
            if hasattr(_value, _test):
                _body[_test] = _skipped(_why)
        _new = "Lease" + _attr
        globals()[_new] = type(_new, (_value,), _body)
        _CLASSES.append(f"{_module.__name__}.{_attr}")


def test_cpython_executor_suite_is_available() -> None:
    if _REASON:
        print(_REASON)
        pytest.skip(_REASON)
    print("CPython process pool test classes run with LeaseExecutor:", ", ".join(_CLASSES))
    assert _CLASSES
