"""blobleases.forksafe: locks held over fork, fresh state in the child, weak registration."""

from __future__ import annotations

import gc
import os
import threading
import weakref

from blobleases import LeaseId, MemoryStorage, forksafe


class _Guarded:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.state = "consistent"
        self.children = 0
        forksafe.register(self, lock=lambda g: g.lock, child=_Guarded.after_fork)

    def after_fork(self) -> None:
        self.lock = threading.RLock()
        self.children += 1


def _in_child(check: object) -> int:
    """Fork, run ``check()`` in the child (exit status 0 when it returns true)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)  # type: ignore[operator]
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_registered_object_is_not_kept_alive() -> None:
    guarded = _Guarded()
    ref = weakref.ref(guarded)
    del guarded
    gc.collect()
    assert ref() is None


def test_memory_storage_is_garbage_collected() -> None:
    storage = MemoryStorage()
    ref = weakref.ref(storage)
    del storage
    gc.collect()
    assert ref() is None


def test_fork_waits_for_a_thread_inside_the_lock_and_the_child_gets_a_fresh_lock() -> None:
    guarded = _Guarded()
    inside, leave = threading.Event(), threading.Event()

    def mutate() -> None:
        with guarded.lock:
            guarded.state = "half-changed"
            inside.set()
            leave.wait()
            guarded.state = "consistent"

    worker = threading.Thread(target=mutate)
    worker.start()
    inside.wait()
    # The fork cannot happen while the worker is inside: let it finish once
    # the fork is waiting (the worker leaves after it sees no more changes).
    threading.Timer(0.05, leave.set).start()

    def check() -> bool:
        # a fresh lock (the inherited one was held by no thread of the child)
        return (
            guarded.state == "consistent" and guarded.children == 1 and guarded.lock.acquire(False)
        )

    assert _in_child(check) == 0
    worker.join()
    assert guarded.children == 0
    assert guarded.lock.acquire(False)  # released in the parent
    guarded.lock.release()


def test_memory_storage_works_in_a_forked_child() -> None:
    storage = MemoryStorage()
    lid = LeaseId.new()
    cid = storage.store_bytes(b"inherited", lid)

    def check() -> bool:
        mine = LeaseId.new()
        storage.lease_by_content(cid, mine)
        ok = storage.get_data(cid, mine) == b"inherited"
        storage.advise_pid_terminated(os.getppid())  # the parent's leases are now another pid's
        return ok and storage.get_data(cid, mine) == b"inherited"

    assert _in_child(check) == 0
    assert storage.get_data(cid, lid) == b"inherited"
