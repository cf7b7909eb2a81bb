"""``blobleases top``, run in a real terminal: a tmux session on a private
server. The test reads the screen (capture-pane), makes another process
store a blob and then SIGKILLs it, checks the figures and the events
change, types ``q`` and checks the exit status. Piped, ``top`` prints one
snapshot and exits.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from test_cli import assert_user_error, cli, ok, ok_json

HOLDER = r"""
import sys
from blobleases import BlobManager, open_storage
lease = BlobManager(open_storage(sys.argv[1])).store(b"h" * 5000)
print(lease.content_id, flush=True)
sys.stdin.read()
"""

#: Generous: the machine is shared and loaded; nothing is timed, only waited for.
WAIT = 120.0


def _need_tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        reason = "tmux is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class Tmux:
    """One tmux session on a private server (its own socket)."""

    def __init__(self, tmux: str, command: str) -> None:
        self.tmux = tmux
        self.socket = f"blobleases-top-{uuid.uuid4().hex[:10]}"
        self._run("new-session", "-d", "-s", "top", "-x", "150", "-y", "50", command)

    def _run(self, *args: str) -> str:
        proc = subprocess.run(
            [self.tmux, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0 and args[0] != "kill-server":
            raise AssertionError(f"tmux {args[0]} failed: {proc.stderr.strip()}")
        return proc.stdout

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "top", *keys)

    def wait_for(self, check: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + WAIT
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if check(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"the screen never showed {what}:\n{screen}")

    def kill(self) -> None:
        self._run("kill-server")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    ok(cli("put", "-", store=path, input=b"first blob"))
    return path


@pytest.fixture
def top(store: Path, tmp_path: Path) -> Iterator[tuple[Tmux, Path]]:
    tmux = _need_tmux()
    status = tmp_path / "status"
    env = f"PYTHONPATH={shlex.quote(os.pathsep.join(sys.path))} TERM=xterm-256color"
    command = (
        f"env {env} {shlex.quote(sys.executable)} -m blobleases --store {shlex.quote(str(store))}"
        f" top; echo $? > {shlex.quote(str(status))}; sleep 30"
    )
    session = Tmux(tmux, command)
    try:
        yield session, status
    finally:
        session.kill()


def _line_with(screen: str, needle: str) -> str:
    return next((line for line in screen.splitlines() if needle in line), "")


def test_top_in_a_terminal_follows_the_store_and_quits_on_q(
    store: Path, top: tuple[Tmux, Path]
) -> None:
    session, status = top
    first = session.wait_for(lambda s: "blobs 1 " in s, "blobs 1")
    assert "blobleases top" in first and "leases 1 " in first and "q quits" in first
    assert "held longest" in first and "(none yet)" in first

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        cid = holder.stdout.readline().strip()
        screen = session.wait_for(
            lambda s: "blobs 2 " in s and str(holder.pid) in s, "the holder's blob and pid"
        )
        assert "leases 2 " in screen
        row = _line_with(screen, f" {holder.pid} ")
        assert "python" in row and "4.9 KiB" in row and " 1 " in row, row
        assert "stored 1 blob (4.9 KiB)" in screen
        assert cid[:23] in screen
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # top's own reads reap the dead holder (within reap_interval)
    screen = session.wait_for(
        lambda s: f"reaped 1 lease of dead pid {holder.pid}" in s, "the reap of the killed holder"
    )
    screen = session.wait_for(lambda s: "blobs 1 " in s and "freed 1 blob" in s, "the freed blob")
    assert "leases 1 " in screen

    session.keys("q")
    deadline = time.monotonic() + WAIT
    while not status.exists() or not status.read_text().strip():
        assert time.monotonic() < deadline, "top did not exit after q"
        time.sleep(0.2)
    assert status.read_text().strip() == "0"


def test_top_not_on_a_terminal_prints_one_snapshot(store: Path) -> None:
    text = ok(cli("top", store=store))
    assert "blobs 1 " in text and "leases 1 " in text and "held longest" in text
    value = ok_json(cli("top", "--json", store=store))
    assert value["totals"]["blobs"] == 1 and value["totals"]["leases"] == 1
    [proc] = value["processes"]
    assert proc["leases"] == 1 and proc["bytes"] == len(b"first blob")
    assert proc["alive"] is False and proc["name"] == "(exited)"  # the put process
    [held] = value["held_longest"]
    assert held["size"] == len(b"first blob") and held["leases"] == 1
    assert value["events"] == []


def test_top_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    assert_user_error(cli("top", store=missing), str(missing))
    assert not missing.exists()
    proc = cli("top", "--interval", "0", store=missing)
    assert proc.returncode == 2 and b"--interval" in proc.stderr
