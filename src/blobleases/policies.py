"""The policies every backend takes as constructor keywords (SPEC section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_SIZE", "Policies", "check_seconds", "check_ttl"]

MAX_SIZE = 2**63 - 1
"""The largest size policy (``max_bytes``, ``retain_bytes``) any backend accepts."""

OnFull = Literal["refuse", "evict"]
Durability = Literal["fast", "safe"]


def _check_size(value: object, name: str, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int{' or None' if optional else ''}, not {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    if value > MAX_SIZE:
        # Every backend keeps sizes in 64-bit integers (SQLite, Redis).
        raise ValueError(
            f"{name} must be at most 2**63 - 1 bytes, not an int of {value.bit_length()} bits"
        )
    return value


def _check_seconds(
    value: object, name: str, *, optional: bool = False, allow_zero: bool = False
) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    kind = "non-negative" if allow_zero else "positive"
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(
            f"{name} must be a {kind} finite number of seconds, not an int of "
            f"{int(value).bit_length()} bits"
        ) from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {kind} finite number of seconds, not {value!r}")
    return seconds


def check_seconds(value: object, name: str) -> float:
    """Return ``value`` as positive finite float seconds, else raise naming ``name``."""
    seconds = _check_seconds(value, name)
    assert seconds is not None
    return seconds


def check_ttl(ttl: object) -> float | None:
    """Return ``ttl`` as float seconds (or None), else raise naming ``ttl``."""
    return _check_seconds(ttl, "ttl", optional=True)


def check_detached(detached: object) -> bool:
    """Return ``detached`` if it is a bool, else raise naming it."""
    if not isinstance(detached, bool):
        raise TypeError(f"detached must be a bool, not {type(detached).__name__}")
    return detached


@dataclass(frozen=True, slots=True)
class Policies:
    """Validated policy settings, shared by every backend.

    * ``max_bytes``: None for unbounded; a store fits while the total stays
      ``<= max_bytes``. ``on_full="refuse"`` raises StoreFull and changes
      nothing; ``"evict"`` evicts least recently used content, unreferenced
      before leased, never content with an open reader.
    * ``retain_bytes``: unreferenced content up to this many bytes stays as an
      LRU cache.
    * ``reap_interval``: seconds between automatic reaps of dead processes.
    * ``transfer_ttl``: seconds a pickled lease's transfer lease lives.
    * ``durability``: ``"fast"`` survives process crashes; ``"safe"`` fsyncs.
    * ``verify_reads``: rehash on every read instead of checking the size.
    * ``lock_timeout``: the longest (seconds) any operation waits for another
      process (a writer lock, a busy index) before StorageError naming what it
      waited for and, where known, the pid holding it.
    """

    max_bytes: int | None = None
    on_full: OnFull = "refuse"
    retain_bytes: int = 0
    reap_interval: float = 5.0
    transfer_ttl: float = 300.0
    durability: Durability = "fast"
    verify_reads: bool = False
    lock_timeout: float = 30.0

    def __post_init__(self) -> None:
        _check_size(self.max_bytes, "max_bytes", optional=True)
        _check_size(self.retain_bytes, "retain_bytes", optional=False)
        if self.on_full not in ("refuse", "evict"):
            raise ValueError(f"on_full must be 'refuse' or 'evict', not {self.on_full!r}")
        if self.durability not in ("fast", "safe"):
            raise ValueError(f"durability must be 'fast' or 'safe', not {self.durability!r}")
        if not isinstance(self.verify_reads, bool):
            raise TypeError(f"verify_reads must be a bool, not {type(self.verify_reads).__name__}")
        object.__setattr__(
            self,
            "reap_interval",
            _check_seconds(self.reap_interval, "reap_interval", allow_zero=True),
        )
        object.__setattr__(self, "transfer_ttl", _check_seconds(self.transfer_ttl, "transfer_ttl"))
        object.__setattr__(self, "lock_timeout", _check_seconds(self.lock_timeout, "lock_timeout"))
