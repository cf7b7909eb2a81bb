"""Making room under ``max_bytes``: the eviction plan, secured on the
server before anything is deleted.

The victims are chosen by :func:`blobleases.policy_rules.plan_eviction`
(retained content first, then with ``on_full="evict"`` leased content, least
recently used first; never content with a reader). Each victim is then
claimed in its own slot (the claim script: refused for content that has a
reader, or for retained content a lease, by then), and while claimed no
lease or reader can be added to it: hold, commit, take_over and read answer
-2 and their caller waits (:func:`run_past_eviction`). The reserve script
then checks, in one step, that the claimed victims free enough and reserves
the room. Only then are they deleted. When a claim is refused or the room
is short, every claim is released and the plan made again; StoreFull when
the policy allows too little, with nothing evicted.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis.exceptions

from .. import policy_rules
from ..content_id import ContentId
from ..errors import StorageError, StoreFull
from .keys import STAGE_TTL_MS, Meta
from .keys import text as _s

if TYPE_CHECKING:
    from ..redis_storage import RedisStorage

__all__ = ["EvictionWait", "make_room", "plan", "run_past_eviction"]

_BATCH = 256


class EvictionWait:
    """Waiting, in short sleeps, while another store evicts a content (a
    script answered -2: the content is claimed; see the claim script). A
    claim lasts at most ``lock_timeout``; waiting longer than that raises
    StorageError naming the content."""

    def __init__(self, storage: RedisStorage, cid: ContentId) -> None:
        self.timeout = storage.policies.lock_timeout
        self.cid = cid
        self.started: float | None = None
        self.pause = 0.001

    def sleep(self, reply: list[Any]) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        elif now - self.started > self.timeout:
            raise StorageError(
                f"waited {self.timeout} s for another store to finish evicting {self.cid} "
                f"(claimed until {_s(reply[1])})"
            )
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, 0.02)


def run_past_eviction(
    storage: RedisStorage, cid: ContentId, build: Callable[[Any], object], script: int
) -> list[Any]:
    """The replies of the pipeline ``build``, run again (after a short
    wait) while the script whose reply is at index ``script`` answers -2:
    another store is evicting ``cid`` (see the claim script)."""
    waited = EvictionWait(storage, cid)
    while True:
        replies = storage._run_pipe(build)
        if int(replies[script][0]) != -2:
            return replies
        waited.sleep(replies[script])


def make_room(storage: RedisStorage, cid: ContentId, size: int, token: str) -> bool:
    """Reserve ``size`` bytes under ``max_bytes`` for an upload, evicting
    per policy; True if reserved (False: the content is indexed already).

    Nothing is deleted before the whole plan is secured on the server:
    the victims that suffice are chosen (policy_rules.plan_eviction),
    each is claimed in its own slot by the claim script (which refuses
    content that has a reader, or for retained content a lease, and from
    then on makes every new lease or reader of it wait), and the reserve
    script checks that the claimed victims free enough and reserves the
    room in one step. Only then are they deleted. When a claim is refused
    or the room is short, every claim is released and the plan made
    again; StoreFull when the policy allows too little, with nothing
    evicted. (A claim lapses after ``lock_timeout``, at most 300 s, so a
    store that dies mid-eviction blocks nobody for long; a store that
    stalls past it finds its victim kept and fails, having evicted the
    others it had claimed.)"""
    limit = storage.policies.max_bytes
    if limit is None:
        return False
    if size > limit:
        raise StoreFull(policy_rules.too_large_message(size, limit))
    storage._flush_touches()
    victims: list[tuple[str, str]] = []
    try:
        for _ in range(8):
            res = storage._ev(
                "reserve",
                [storage._keys.index, storage._keys.total_bytes, storage._keys.reserved_bytes],
                [
                    str(cid),
                    size,
                    token,
                    limit,
                    time.time() + STAGE_TTL_MS / 1000,
                    storage._owner(os.getpid()),
                    time.time(),
                    *(victim for victim, _ in victims),
                ],
            )
            status = int(res[0])
            if status == 0:
                return False
            if status == 1:
                break
            unclaim(storage, victims, token)
            victims = []
            total = int(res[1])
            planned = storage._plan_eviction(total + size - limit)
            if planned is None:
                raise StoreFull(
                    policy_rules.over_limit_message(size, limit, total, storage.policies.on_full)
                )
            victims = claim(storage, planned, token)
        else:
            raise StoreFull(f"storing {size} bytes: could not make room under max_bytes={limit}")
    except BaseException:
        with contextlib.suppress(redis.exceptions.RedisError):
            unclaim(storage, victims, token)
        raise
    kept: list[str] = []
    evicted = freed = 0
    try:
        for victim, _ in victims:
            n = storage._delete(victim, "claimed", claim=token)
            if n:
                evicted += 1
                freed += n
            else:
                kept.append(victim)
    finally:
        if evicted:
            storage._run_pipe(
                lambda p: [
                    p.hincrby(storage._keys.evictions, "blobs", evicted),
                    p.hincrby(storage._keys.evictions, "bytes", freed),
                ]
            )
            storage._note_evictions(evicted, freed)
    # A victim not deleted here was deleted by another client (its room
    # is free) or outlived this store's claim (it stays).
    if any(storage._r.exists(storage._keys.meta(victim)) for victim in kept):
        storage._ev("idx_remove", storage._keys.index_keys(), [str(cid), token])
        raise StoreFull(
            f"storing {size} bytes: the eviction claim on content chosen for eviction "
            f"lapsed before it was evicted (max_bytes={limit})"
        )
    return True


def claim(
    storage: RedisStorage, planned: list[tuple[str, str]], token: str
) -> list[tuple[str, str]]:
    """Claim every planned victim for this store (see the claim script);
    all of them, or none (then the plan must be made again: []). Victims
    already gone count as claimed: their room is free."""
    deadline = time.time() + min(storage.policies.lock_timeout, 300.0)
    claimed: list[tuple[str, str]] = []
    for victim, mode in planned:
        res = storage._ev("claim", storage._ckeys(victim), [mode, token, deadline, time.time()])
        if int(res[0]) < 0:
            unclaim(storage, claimed, token)
            return []
        claimed.append((victim, mode))
    return claimed


def unclaim(storage: RedisStorage, victims: list[tuple[str, str]], token: str) -> None:
    for victim, _ in victims:
        storage._ev("unclaim", [storage._keys.meta(victim)], [token])


def plan(storage: RedisStorage, need: int) -> list[tuple[str, str]] | None:
    """Victims, with their claim mode, that free at least ``need`` bytes,
    by policy_rules.plan_eviction; None if not enough can be freed.
    Content another store has claimed counts as having a reader (it is
    passed over); the claim script checks each again atomically."""
    retained = [_s(c) for c in storage._r.zrange(storage._keys.retained, 0, -1)]
    busy = readers_or_claims(storage, retained)
    retained_sizes = indexed_sizes(storage, [c for c in retained if not busy[c]])

    def leased() -> Iterator[tuple[str, int, bool]]:
        skip = set(retained)
        start = 0
        while batch := [
            _s(c) for c in storage._r.zrange(storage._keys.lru, start, start + _BATCH - 1)
        ]:
            start += _BATCH
            batch = [c for c in batch if c not in skip]
            sizes = indexed_sizes(storage, batch)
            for cid_text, has_reader in readers_or_claims(storage, batch).items():
                if cid_text in sizes:
                    yield cid_text, sizes[cid_text], has_reader

    victims = policy_rules.plan_eviction(
        need, retained_sizes.items(), leased(), storage.policies.on_full
    )
    if victims is None:
        return None
    return [(c, "retained" if c in retained_sizes else "leased") for c in victims]


def readers_or_claims(storage: RedisStorage, cids: list[str]) -> dict[str, bool]:
    """Whether each content has a reader or an eviction claim now."""
    replies = storage._each(
        cids,
        lambda p, c: [
            p.hlen(storage._base(c) + "readers"),
            p.hget(storage._keys.meta(c), Meta.EVICTING),
        ],
    )
    now = time.time()
    out: dict[str, bool] = {}
    for k, cid_text in enumerate(cids):
        readers, claim = replies[2 * k], replies[2 * k + 1]
        claimed = bool(claim) and float(_s(claim).rsplit(" ", 1)[-1]) > now
        out[cid_text] = bool(int(readers)) or claimed
    return out


def indexed_sizes(storage: RedisStorage, cids: list[str]) -> dict[str, int]:
    if not cids:
        return {}
    values = storage._r.hmget(storage._keys.index, cids)
    return {c: int(_s(v).split(" ", 1)[0]) for c, v in zip(cids, values, strict=True) if v}
