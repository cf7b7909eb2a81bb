"""Lease ids: a random uuid and the pid of the process the lease belongs to."""

from __future__ import annotations

import os
import re
import uuid as uuid_module
from dataclasses import dataclass, field

from .errors import InvalidLeaseId

__all__ = ["MAX_PID", "LeaseId", "check_pid"]

_PARSE = re.compile(
    r"lease:pid=([1-9][0-9]{0,9}),"
    r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)


class _InvalidLeaseIdType(InvalidLeaseId, TypeError):
    """Raised when ``LeaseId.parse`` is given something that is not a str."""


class _PidError(ValueError, TypeError):
    """A pid that is not a positive int (a ValueError, and a TypeError for non-ints)."""


MAX_PID = 2**31 - 1
"""The largest pid any platform gives (``pid_t`` is a signed 32-bit int)."""


def check_pid(pid: object, name: str = "pid") -> int:
    """Return ``pid`` if it is an int in 1..MAX_PID, else raise a ValueError naming it."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise _PidError(f"{name} must be a positive int, not {type(pid).__name__} {pid!r}")
    if pid <= 0:
        raise ValueError(f"{name} must be a positive int, not {pid}")
    if pid > MAX_PID:
        shown = pid if pid.bit_length() <= 64 else f"an int of {pid.bit_length()} bits"
        raise ValueError(f"{name} must be at most 2**31 - 1 (the largest pid), not {shown}")
    return pid


@dataclass(frozen=True, slots=True)
class LeaseId:
    """Names one lease: a random ``uuid`` (version 4, never a MAC) and a ``pid``."""

    uuid: uuid_module.UUID
    pid: int
    _hash: int = field(init=False, repr=False, compare=False)
    _text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, uuid_module.UUID):
            raise TypeError(f"uuid must be a uuid.UUID, not {type(self.uuid).__name__}")
        check_pid(self.pid)
        # Ids key every lease table: hash once, not on every lookup.
        object.__setattr__(self, "_hash", hash((self.uuid.int, self.pid)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[LeaseId], tuple[uuid_module.UUID, int]]:
        return (LeaseId, (self.uuid, self.pid))

    @classmethod
    def new(cls, pid: int | None = None) -> LeaseId:
        """A fresh lease id for ``pid`` (default: this process)."""
        return cls(uuid_module.uuid4(), os.getpid() if pid is None else check_pid(pid))

    def __str__(self) -> str:
        try:
            return self._text
        except AttributeError:
            text = f"lease:pid={self.pid},{self.uuid}"
            object.__setattr__(self, "_text", text)
            return text

    def __repr__(self) -> str:
        return f"LeaseId({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> LeaseId:
        """Parse ``lease:pid=<pid>,<uuid>`` exactly as ``str()`` prints it."""
        if not isinstance(text, str):
            raise _InvalidLeaseIdType(f"lease id must be a str, not {type(text).__name__}")
        match = _PARSE.fullmatch(text.lower() if text.startswith("lease:") else text)
        if match is None:
            raise InvalidLeaseId(f"invalid lease id {text!r}: expected 'lease:pid=<pid>,<uuid>'")
        pid = int(match.group(1))
        if pid > MAX_PID:
            raise InvalidLeaseId(f"invalid lease id {text!r}: pid {pid} is above 2**31 - 1")
        return cls(uuid_module.UUID(match.group(2)), pid)
