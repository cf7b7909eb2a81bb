"""The Lua scripts of ``scripts.lua`` on one server or cluster.

Sections of ``scripts.lua`` start with ``--@ NAME`` (optionally Redis 7 script
flags after the name); the prelude before the first section is prepended to
each. Every script is loaded by its SHA and run with EVALSHA; a server that
lost its scripts (restart, SCRIPT FLUSH) gets them again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis.exceptions

from .keys import text as _s

__all__ = ["Scripts", "load_scripts"]

_BATCH = 256


@functools.cache
def load_scripts() -> dict[str, str]:
    """The scripts of redis_storage.lua by name. A section header may name
    Redis 7 script flags after the name (``--@ end allow-oom``): the script
    then starts with the ``#!lua flags=...`` shebang."""
    text = resources.files("blobleases.redis").joinpath("scripts.lua").read_text("utf-8")
    parts = re.split(r"^--@ (\w+)((?: [\w-]+)*)\s*$", text, flags=re.M)
    prelude = parts[0]
    out: dict[str, str] = {}
    for name, flags, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        out[name] = _with_flags(flags.split(), prelude + body)
    return out


def _with_flags(flags: list[str], body: str) -> str:
    return f"#!lua flags={','.join(flags)}\n{body}" if flags else body


def _without_flags(body: str) -> str:
    """A script without its shebang (for servers before Redis 7, which have no
    script flags and let a script run until its first write that needs memory)."""
    return body.split("\n", 1)[1] if body.startswith("#!") else body


class Scripts:
    """The scripts loaded on ``client``: ``run`` one, ``queue`` one in a
    pipeline, run a ``pipeline`` of idempotent commands."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self._scripts: dict[str, tuple[str, str]] = {
            name: (body, "") for name, body in load_scripts().items()
        }

    def load_all(self) -> None:
        for name, (body, _) in list(self._scripts.items()):
            try:
                sha = self._r.script_load(body)
            except redis.exceptions.ResponseError:
                if not body.startswith("#!"):
                    raise
                body = _without_flags(body)
                sha = self._r.script_load(body)
            self._scripts[name] = (body, _s(sha))

    def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._scripts[name][1]
        try:
            return self._r.evalsha(sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load_all()
            return self._r.evalsha(self._scripts[name][1], len(keys), *keys, *args)

    def queue(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        # execute_command: redis-py's cluster pipeline blocks its evalsha method
        # but routes EVALSHA by its keys like any other command.
        pipe.execute_command("EVALSHA", self._scripts[name][1], len(keys), *keys, *args)

    def pipeline(self, build: Callable[[Any], object]) -> list[Any]:
        """Run a pipeline built by ``build`` (which must hold only idempotent
        commands); reload the scripts and run it again if the server lost them."""
        for attempt in (0, 1):
            pipe = self._r.pipeline(transaction=False)
            build(pipe)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self.load_all()
        raise AssertionError("unreachable")  # pragma: no cover

    def each(self, items: list[str], command: Callable[[Any, str], object]) -> list[Any]:
        """``command(pipe, item)`` for every item, pipelined in batches; the replies."""
        out: list[Any] = []
        for i in range(0, len(items), _BATCH):
            batch = items[i : i + _BATCH]

            def build(pipe: Any, b: list[str] = batch) -> None:
                for item in b:
                    command(pipe, item)

            out.extend(self.pipeline(build))
        return out
