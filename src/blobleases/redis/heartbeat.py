"""This process's heartbeat on the server, and the id of this host.

Each process keeps a key ``P:heartbeat:<owner>`` with a TTL
(``heartbeat_ttl``), refreshed by a daemon thread every ``ttl / 5``; a
process whose heartbeat lapsed is dead to every other client, which then
reaps its leases and reader holds. A handle also keeps the heartbeats of
local pids it vouched for (``advise_of_pid``) while they live.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

import redis.exceptions

from ..liveness import HeartbeatThread, is_dead, vouch

__all__ = ["Heartbeat", "default_host_id", "is_dead", "vouch"]


def default_host_id() -> str:
    """A stable id of this machine: its hostname and the start of
    ``/etc/machine-id`` (containers sharing an image keep distinct hostnames)."""
    name = socket.gethostname() or "host"
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                machine = f.read().strip()[:12]
            break
        except OSError:
            continue
    text = f"{name}.{machine}" if machine else name
    text = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64]
    return text or "host"


class Heartbeat(HeartbeatThread):
    """A daemon thread refreshing this process's heartbeat key (and those of
    local pids this handle vouches for) every ``ttl / 5`` seconds."""

    def __init__(self, client: Any, key_of: Callable[[int], str], ttl: float) -> None:
        super().__init__(ttl / 5)
        self.client = client
        self.key_of = key_of
        self.ttl_ms = max(int(ttl * 1000), 1)
        self.missing = True
        self.start_beating("blobleases-heartbeat")

    def beat(self) -> None:
        """Refresh the heartbeats. A server at maxmemory refuses SET but not
        PEXPIRE, so there the heartbeats that exist are kept alive (and
        ``missing`` says whether this process's own is absent)."""
        pipe = self.client.pipeline(transaction=False)
        keys = [self.key_of(self.pid)]
        pipe.set(keys[0], repr(self.start), px=self.ttl_ms)
        for pid, start in self.live_adopted():
            keys.append(self.key_of(pid))
            pipe.set(keys[-1], repr(start), px=self.ttl_ms)
        replies = pipe.execute(raise_on_error=False)
        refused = [
            k
            for k, r in zip(keys, replies, strict=True)
            if isinstance(r, redis.exceptions.OutOfMemoryError)
        ]
        for reply in replies:
            if isinstance(reply, Exception) and not isinstance(
                reply, redis.exceptions.OutOfMemoryError
            ):
                raise reply
        own_missing = False
        if refused:
            pipe = self.client.pipeline(transaction=False)
            for key in refused:
                pipe.pexpire(key, self.ttl_ms)
            kept = pipe.execute()
            own_missing = keys[0] in refused and not kept[0]
        self.missing = own_missing

    def adopt(self, pid: int, start: float) -> None:
        super().adopt(pid, start)
        self.client.set(self.key_of(pid), repr(start), px=self.ttl_ms)
