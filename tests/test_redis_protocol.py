"""How RedisStorage talks RESP: its connections use the parser that receives
long replies straight into their buffer and the packer that sends long
arguments as they are (hiredis or not); exact bytes at every size around the
parser's threshold, several long replies in one pipeline, and a reply cut off
or stalled midway (an error, never short or shifted bytes, and the next
command works on a new connection)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from blobleases import LeaseId
from blobleases.redis_protocol import BULK_MIN, BULK_READ_SIZE, command_packer, parser_class
from blobleases.redis_storage import RedisStorage
from redis_servers import RedisServer

pytestmark = pytest.mark.redis


def _client(url: str, protocol: int, **options: Any) -> redis.Redis:
    parser = parser_class(protocol)
    assert parser is not None
    return redis.Redis.from_url(
        url,
        protocol=protocol,
        parser_class=parser,
        socket_read_size=BULK_READ_SIZE,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def _check_connection(conn: Any) -> None:
    assert type(conn._parser).__name__.startswith("Bulk")
    assert type(conn._parser._buffer).__name__ == "_BulkSocketBuffer"
    assert conn._command_packer is command_packer()
    assert type(conn._command_packer).__name__ == "PythonRespSerializer"
    # a long argument goes out as the caller's own buffer, not a copy
    chunk = memoryview(bytes(1 << 20))
    packed = conn._command_packer.pack("SET", "k", chunk)
    assert any(part is chunk for part in packed)


def test_storage_connections_use_the_bulk_parser_and_python_packer(
    redis_server: RedisServer,
) -> None:
    with RedisStorage(redis_server.url, namespace="t-parser") as storage:
        conn = storage.client.connection_pool.get_connection()
        try:
            _check_connection(conn)
        finally:
            storage.client.connection_pool.release(conn)


def test_cluster_node_connections_use_them_too(redis_cluster: Any) -> None:
    with RedisStorage(redis_cluster.url, namespace="t-parser") as storage:
        data = os.urandom(3 << 20)
        cid = storage.store_bytes(data, lid := LeaseId.new())
        assert storage.get_data(cid, lid) == data
        nodes = storage.client.get_nodes()
        assert len(nodes) == 3
        for node in nodes:
            pool = node.redis_connection.connection_pool
            conn = pool.get_connection()
            try:
                _check_connection(conn)
            finally:
                pool.release(conn)
        storage.advise_lease_dropped(lid, cid)


@pytest.mark.parametrize("protocol", [2, 3])
def test_replies_of_every_size_around_the_threshold_are_exact(
    redis_server: RedisServer, protocol: int
) -> None:
    client = _client(redis_server.url, protocol)
    sizes = [0, 1, BULK_MIN - 3, BULK_MIN - 2, BULK_MIN, BULK_MIN + 1, 3 << 20, (8 << 20) + 5]
    values = {f"t-replies:{protocol}:{n}": os.urandom(n) for n in sizes}
    try:
        for key, value in values.items():
            client.set(key, value)
        for key, value in values.items():
            assert client.get(key) == value
        pipe = client.pipeline(transaction=False)
        for key in values:
            pipe.get(key)
            pipe.strlen(key)
        got = pipe.execute()
        for i, value in enumerate(values.values()):
            assert got[2 * i] == value
            assert got[2 * i + 1] == len(value)
        assert (
            client.getrange(f"t-replies:{protocol}:{3 << 20}", 5, 5 + BULK_MIN)
            == (values[f"t-replies:{protocol}:{3 << 20}"][5 : 6 + BULK_MIN])
        )
    finally:
        client.delete(*values)
        client.close()


class _CutServer:
    """A fake Redis (RESP2) that answers its first connection's first command
    with the header and half the bytes of a 1 MiB bulk reply, then closes the
    connection (``stall=False``) or goes silent; later connections get the
    whole reply."""

    SIZE = 1 << 20

    def __init__(self, stall: bool) -> None:
        self.value = os.urandom(self.SIZE)
        self.stall = stall
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.gets = 0
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._answer, args=(conn, self.connections), daemon=True
            ).start()

    def _answer(self, conn: socket.socket, number: int) -> None:
        header = b"$%d\r\n" % self.SIZE
        with conn:
            while data := conn.recv(65536):
                # redis-py sends one command at a time here: CLIENT SETINFO
                # on connecting, then the GET under test.
                if b"$3\r\nGET\r\n" not in data:
                    conn.sendall(b"+OK\r\n")
                elif number == 1:
                    self.gets += 1
                    conn.sendall(header + self.value[: self.SIZE // 2])
                    if self.stall:
                        self.release.wait(30)
                    return
                else:
                    self.gets += 1
                    conn.sendall(header + self.value + b"\r\n")

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture(params=[False, True], ids=["closed", "stalled"])
def cut_server(request: pytest.FixtureRequest) -> Iterator[_CutServer]:
    server = _CutServer(stall=request.param)
    yield server
    server.close()


def test_reply_cut_midway_raises_and_the_next_command_reconnects(cut_server: _CutServer) -> None:
    client = _client(cut_server.url, 2, socket_timeout=1.0)
    try:
        expected = redis.TimeoutError if cut_server.stall else redis.ConnectionError
        with pytest.raises(expected):
            client.get("k")
        assert client.get("k") == cut_server.value
        assert (cut_server.connections, cut_server.gets) == (2, 2)
    finally:
        client.close()
