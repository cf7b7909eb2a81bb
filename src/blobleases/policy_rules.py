"""The policy rules of SPEC section 3, once, as small pure functions.

Every backend decides with these (the Lua of ``redis_storage.lua`` mirrors
them where a decision must be atomic on the server, commented as a mirror):

- eviction order: retained (unreferenced) content first, then, with
  ``on_full="evict"``, leased content, least recently used first; content
  with an open reader is never evicted (:func:`plan_eviction`);
- a store that cannot fit even after evicting all that may go evicts
  nothing: the plan is decided before anything is deleted, and ``None``
  means StoreFull with nothing changed;
- retain or delete content that became unreferenced (:func:`retains`,
  :func:`over_retain_budget`);
- the StoreFull messages (:func:`too_large_message`, :func:`over_limit_message`);
- when a ttl lease ends (:func:`expires_at`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

__all__ = [
    "expires_at",
    "over_limit_message",
    "over_retain_budget",
    "plan_eviction",
    "retains",
    "too_large_message",
]

K = TypeVar("K")


def plan_eviction(
    need: int,
    retained: Iterable[tuple[K, int]],
    leased: Iterable[tuple[K, int, bool]],
    on_full: str,
) -> list[K] | None:
    """The victims that free at least ``need`` bytes, or None if the policy
    allows too little (then nothing may be evicted).

    ``retained``: unreferenced content (key, size), least recently used
    first. ``leased``: the other content (key, size, has_reader), least
    recently used first; read only with ``on_full="evict"`` and only as far
    as needed, so a backend may pass a lazy cursor. Content with a reader is
    passed over."""
    victims: list[K] = []
    if need <= 0:
        return victims
    for key, size in retained:
        victims.append(key)
        need -= size
        if need <= 0:
            return victims
    if on_full == "evict":
        for key, size, has_reader in leased:
            if has_reader:
                continue
            victims.append(key)
            need -= size
            if need <= 0:
                return victims
    return None


def retains(size: int, retain_bytes: int) -> bool:
    """Whether content of ``size`` bytes that became unreferenced is kept in
    the retained LRU (else it is deleted at once)."""
    return retain_bytes > 0 and size <= retain_bytes


def over_retain_budget(
    retained_bytes: int, retain_bytes: int, oldest_first: Iterable[tuple[K, int]]
) -> list[K]:
    """The retained content to delete, least recently used first, so the
    retained total (``retained_bytes``) comes back within ``retain_bytes``.
    ``oldest_first`` is read only as far as needed (a lazy cursor may lock
    what it yields)."""
    dropped: list[K] = []
    if retained_bytes <= retain_bytes:
        return dropped
    for key, size in oldest_first:
        dropped.append(key)
        retained_bytes -= size
        if retained_bytes <= retain_bytes:
            break
    return dropped


def too_large_message(size: int, limit: int) -> str:
    """StoreFull: a blob larger than ``max_bytes`` itself."""
    return f"a blob of {size} bytes cannot fit in max_bytes={limit}"


def over_limit_message(size: int, limit: int, total: int, on_full: str) -> str:
    """StoreFull: the policy cannot free room for ``size`` more bytes."""
    return (
        f"storing {size} bytes would exceed max_bytes={limit} "
        f"({total} bytes held; on_full={on_full!r})"
    )


def expires_at(ttl: float | None, now: float) -> float | None:
    """When a lease taken at ``now`` with ``ttl`` seconds ends (None: never)."""
    return None if ttl is None else now + ttl
