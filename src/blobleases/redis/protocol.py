"""Talking RESP to Redis with fewer copies of blob chunks.

RedisStorage sends and receives blob chunks of megabytes. redis-py's
pure-Python parser reads every reply through an ``io.BytesIO``: a 1 MiB chunk
is received into a new bytes object, appended to the buffer (which grows by
reallocation), read back out of it and sliced to drop its CRLF: four copies,
and in a fresh process as many page faults. So RedisStorage connections use
a parser whose socket buffer receives a long bulk reply straight into a
buffer the connection keeps (one copy from the kernel, one into the bytes
returned). When hiredis is installed, redis-py would also pack commands with
it, copying every argument (a 1 MiB chunk included) into one new string; the
pure-Python packer sends a long argument as it is. RedisStorage uses both
whether or not hiredis is installed, so its speed does not depend on it.

This relies on redis-py internals (``redis._parsers``, the
``PythonRespSerializer`` packer) that have been stable since redis-py 5;
:func:`parser_class` and :func:`command_packer` return ``None`` (keep redis-py's
defaults) when they are not as expected.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BULK_MIN", "BULK_READ_SIZE", "command_packer", "connection_class", "parser_class"]

BULK_MIN = 256 << 10
"""Replies at least this long are received straight into their own buffer."""

_LANDING_MAX = 8 << 20
"""Replies up to this long land in a buffer that the connection keeps."""

BULK_READ_SIZE = 64 << 10
"""The socket read size to use with these parsers: a reply's header line is
read in pieces this big, and the rest of a long reply straight into place."""

try:
    from redis._parsers import Encoder, _RESP2Parser, _RESP3Parser
    from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR, SocketBuffer
    from redis.connection import Connection, PythonRespSerializer
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.utils import SENTINEL
except ImportError:  # pragma: no cover - a redis-py without these internals
    _AVAILABLE = False
else:
    _AVAILABLE = all(hasattr(SocketBuffer, name) for name in ("read", "_read_from_socket", "purge"))

if _AVAILABLE:

    class _BulkSocketBuffer(SocketBuffer):
        """A SocketBuffer that receives long replies into one buffer."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            # Kept by the connection: as long as the longest reply read so far
            # (at most _LANDING_MAX).
            self._landing = bytearray()

        def read(self, length: int, timeout: Any = SENTINEL) -> bytes:
            if length < BULK_MIN:
                return super().read(length, timeout)
            want = length + 2  # the reply and its CRLF
            head = self._buffer.read(want)
            if len(head) == want:
                return head[:-2]
            if want <= _LANDING_MAX:
                # One landing buffer per connection, reused: no allocation
                # (and no page faults) per reply.
                if len(self._landing) < want:
                    self._landing = bytearray(want)
                view = memoryview(self._landing)[:want]
            else:
                view = memoryview(bytearray(want))
            got = len(head)
            view[:got] = head
            del head
            sock = self._sock
            if timeout is not SENTINEL:
                sock.settimeout(timeout)
            try:
                while got < want:
                    n = sock.recv_into(view[got:])
                    if not n:
                        raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                    got += n
            finally:
                if timeout is not SENTINEL:
                    sock.settimeout(self.socket_timeout)
            # A failure above leaves the stream mid-reply: redis-py disconnects
            # the connection on any error while reading, so it is never reused.
            with view:
                return bytes(view[:length])

    def _bulk(base: type[Any]) -> type[Any]:
        class BulkParser(base):  # type: ignore[misc]
            def on_connect(self, connection: Any) -> None:
                super().on_connect(connection)
                buffer: Any = self._buffer  # type: ignore[has-type]
                if type(buffer) is SocketBuffer:
                    self._buffer = _BulkSocketBuffer(
                        self._sock, self.socket_read_size, connection.socket_timeout
                    )

        BulkParser.__name__ = BulkParser.__qualname__ = f"Bulk{base.__name__.lstrip('_')}"
        return BulkParser

    _PARSERS: dict[int, type[Any]] = {2: _bulk(_RESP2Parser), 3: _bulk(_RESP3Parser)}
    # What redis-py's Connection builds without hiredis (bytes in, bytes out:
    # RedisStorage never decodes responses); stateless, so shared.
    _PACKER: Any = PythonRespSerializer(
        6000,
        Encoder("utf-8", "strict", False).encode,  # type: ignore[no-untyped-call]
    )

    class _BulkConnection(Connection):
        """A TCP connection with this module's parser (for its ``protocol``,
        which must be given) and packer: for RedisCluster, which passes
        neither option on to the connections of its nodes."""

        def __init__(self, **kwargs: Any) -> None:
            kwargs["parser_class"] = _PARSERS[int(kwargs["protocol"])]
            kwargs["command_packer"] = _PACKER
            kwargs["socket_read_size"] = BULK_READ_SIZE
            super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    _CONNECTION: type[Any] | None = _BulkConnection
else:  # pragma: no cover
    _PARSERS = {}
    _PACKER = None
    _CONNECTION = None


def parser_class(protocol: int) -> type[Any] | None:
    """The parser class for connections speaking RESP ``protocol`` (2 or 3),
    or None to keep redis-py's default."""
    return _PARSERS.get(protocol)


def command_packer() -> Any:
    """The command packer for RedisStorage connections (pure Python: long
    arguments are sent without a copy), or None to keep redis-py's default."""
    return _PACKER


def connection_class() -> type[Any] | None:
    """A redis-py TCP ``Connection`` class that uses :func:`parser_class` (for
    the ``protocol`` it is given) and :func:`command_packer`, or None."""
    return _CONNECTION
