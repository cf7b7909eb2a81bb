"""A network namespace per simulated host, joined to the test's namespace by
a veth pair: a process started in it reaches PostgreSQL and S3 (which
listen on loopback here) only through relays on the veth address, never
through loopback.

Needs root and ``ip`` (iproute2); :class:`HostNetwork` raises
:class:`NetnsUnavailable`, saying why, where either is refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import shutil
import socket
import subprocess
import threading

__all__ = ["HostNetwork", "NetnsUnavailable", "Relay"]


class NetnsUnavailable(RuntimeError):
    """Network namespaces or veth pairs cannot be made here."""


class Relay:
    """Accepts TCP connections on ``(address, port)`` (port picked at run
    time) and pipes each to ``target``, both ways, until either side ends."""

    def __init__(self, address: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((address, 0))
        self.address = address
        self.port = int(self.server.getsockname()[1])
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, name="pg-netns-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inner, _ = self.server.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(self.target, timeout=10)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            with self.lock:
                if self.closed:
                    inner.close()
                    outer.close()
                    return
                self.open += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns, self.open = self.open, []
        self.server.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.0.0.0/8 that no address of this namespace is in."""
    done = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    )
    used = [
        ipaddress.ip_interface(word).network
        for line in done.stdout.splitlines()
        for word in line.split()
        if "/" in word and word[0].isdigit()
    ]
    for _ in range(100):
        n = secrets.randbelow(1 << 22)
        subnet = ipaddress.ip_network(f"10.{n >> 14}.{(n >> 6) & 255}.{(n & 63) * 4}/30")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise NetnsUnavailable("no free /30 in 10.0.0.0/8")


class HostNetwork:
    """A named network namespace (``blt-<hex>``) with loopback up and one
    end of a veth pair, the other end here: ``outer`` (here) and ``inner``
    (in the namespace) are the pair's addresses."""

    def __init__(self) -> None:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the ip command (iproute2) is missing")
        tag = secrets.token_hex(3)
        self.name = f"blt-{tag}"
        self.link = f"blt{tag}o"
        peer = f"blt{tag}i"
        subnet = _free_subnet()
        first, second = list(subnet.hosts())
        self.outer, self.inner = str(first), str(second)
        self.relays: list[Relay] = []
        self.made: list[str] = []
        try:
            _ip("netns", "add", self.name)
            self.made.append("netns")
            _ip("link", "add", self.link, "type", "veth", "peer", "name", peer)
            self.made.append("link")
            _ip("link", "set", peer, "netns", self.name)
            _ip("addr", "add", f"{self.outer}/30", "dev", self.link)
            _ip("link", "set", self.link, "up")
            inside = ("netns", "exec", self.name, "ip")
            _ip(*inside, "addr", "add", f"{self.inner}/30", "dev", peer)
            _ip(*inside, "link", "set", peer, "up")
            _ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def relay(self, port: int) -> int:
        """A port on ``outer`` that leads to ``127.0.0.1:port`` here."""
        relay = Relay(self.outer, ("127.0.0.1", port))
        self.relays.append(relay)
        return relay.port

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        for relay in self.relays:
            relay.close()
        self.relays = []
        if "link" in self.made:
            with contextlib.suppress(NetnsUnavailable):
                _ip("link", "del", self.link)  # its peer goes with it
        if "netns" in self.made:
            with contextlib.suppress(NetnsUnavailable):
                _ip("netns", "del", self.name)
        self.made = []
