"""Real redis-server processes on loopback for the Redis tests.

A standalone server and a 3-master cluster, each in a private temporary
directory on ports picked at run time, stopped at the end. The binaries come
from Debian's redis-server package, installed when missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["RedisCluster", "RedisServer", "RedisUnavailable", "ensure_redis_binaries", "free_port"]


class RedisUnavailable(RuntimeError):
    """redis-server could not be installed or started here."""


def ensure_redis_binaries() -> tuple[str, str]:
    """Paths of redis-server and redis-cli, installing the Debian package if
    they are missing (as root; ``apt-get update`` first if the install fails)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RedisUnavailable("redis-server is not installed and cannot be installed here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "redis-server", "redis-tools"]
    done = subprocess.run(install, env=env, capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, check=False)
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        raise RedisUnavailable(
            f"apt-get install redis-server failed: {done.stderr.decode(errors='replace')[-500:]}"
        )
    return server, cli


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port nobody listens on (and port + 10000 too, for a cluster
    node's bus)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise RedisUnavailable("no free loopback port found")


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server on 127.0.0.1:``port``, data in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        persistence: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.server, self.cli = ensure_redis_binaries()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port(with_bus=bool(extra))
        self.persistence = persistence
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [
            self.server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            args += ["--appendonly", "no", "--save", ""]
        return args + list(self.extra)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = ""
                with contextlib.suppress(OSError):
                    log = (self.directory / "redis.log").read_text()[-800:]
                self.stop()
                raise RedisUnavailable(f"redis-server on port {self.port} did not start: {log}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``, else SIGTERM) and wait."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: it accepts connections (the kernel does) but
        never answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def cli_call(self, *args: str) -> str:
        done = subprocess.run(
            [self.cli, "-p", str(self.port), *args],
            capture_output=True,
            check=True,
            timeout=30,
        )
        return done.stdout.decode()


class RedisCluster:
    """Three masters on loopback joined by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(3):
                port = free_port(with_bus=True)
                node_dir = directory / f"node{i}"
                extra = (
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                )
                self.nodes.append(RedisServer(node_dir, port, extra=extra))
            cli = self.nodes[0].cli
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            done = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise RedisUnavailable(
                    f"redis-cli --cluster create failed: {done.stdout.decode()[-800:]}"
                )
            deadline = time.monotonic() + 30
            while not all("cluster_state:ok" in n.cli_call("cluster", "info") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RedisUnavailable("the cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)
