"""Fork safety, once: objects whose lock must not cross ``fork`` half-held.

A backend registers each handle with :func:`register`. The guarantee, for
every live registered object (held weakly, so registering never keeps a
handle alive):

- before ``os.fork`` (in the forking thread) its lock is acquired, in
  registration order, so no other thread of this process is inside it at
  the fork: the child inherits its state consistent, never mid-change;
- in the parent after the fork the locks are released again (newest
  first);
- in the child the functions given to :func:`on_child` run first (module
  state: e.g. inherited kernel locks to forget), then each object's
  ``child`` callback, which must give the object fresh locks (the
  inherited ones are held by a thread that does not exist in the child)
  and drop whatever belongs to the parent process (connections, threads).

``multiprocessing``'s fork start method, ``subprocess`` with
``preexec_fn`` and a bare ``os.fork()`` all go through these hooks.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["Lockable", "on_child", "register"]


class Lockable(Protocol):
    """What :func:`register` needs of a lock (``threading.Lock``/``RLock``)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


T = TypeVar("T")

_guard = threading.Lock()  # guards the tables below (never held across a callback)
_objects: dict[int, tuple[weakref.ref[Any], Callable[[Any], Lockable], Callable[[Any], None]]] = {}
_ids = iter(range(1, 1 << 62))
_child_hooks: list[Callable[[], None]] = []
_held: list[Lockable] = []


def register(obj: T, *, lock: Callable[[T], Lockable], child: Callable[[T], None]) -> None:
    """Guard ``obj`` across fork: ``lock(obj)`` is held over the fork and
    ``child(obj)`` runs in the child (see the module docstring). The entry
    goes when ``obj`` is garbage-collected."""
    with _guard:
        key = next(_ids)

        def forget(_: object, key: int = key) -> None:
            _objects.pop(key, None)

        _objects[key] = (weakref.ref(obj, forget), lock, child)


def on_child(func: Callable[[], None]) -> None:
    """Run ``func()`` in every forked child, before the objects' callbacks."""
    with _guard:
        _child_hooks.append(func)


def _live() -> list[tuple[Any, Callable[[Any], Lockable], Callable[[Any], None]]]:
    with _guard:
        entries = list(_objects.values())
    live = []
    for ref, lock, child in entries:
        obj = ref()
        if obj is not None:
            live.append((obj, lock, child))
    return live


_pending: list[tuple[Any, Callable[[Any], None]]] = []


def _before() -> None:
    live = _live()
    for obj, lock, child in live:
        held = lock(obj)
        held.acquire()
        _held.append(held)
        _pending.append((obj, child))


def _after_in_parent() -> None:
    held, _held[:] = list(_held), []
    _pending.clear()
    for lock in reversed(held):
        lock.release()


def _after_in_child() -> None:
    global _guard
    _guard = threading.Lock()
    _held.clear()
    pending, _pending[:] = list(_pending), []
    for func in list(_child_hooks):
        func()
    for obj, child in pending:
        child(obj)


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
