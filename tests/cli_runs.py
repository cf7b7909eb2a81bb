"""The command line run as a real program, as several test modules run it:
:func:`run_cli` and :func:`one_error_line` (the one-line error every user
mistake gets), :func:`run_on_pty` (on a pseudo-terminal, for what the
command draws only on a terminal)."""

from __future__ import annotations

import errno
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m blobleases ARGS`` with this interpreter's ``sys.path``;
    its output captured as text."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "blobleases", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
        cwd=cwd,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed run wrote: exit status 1, exactly one line on
    stderr, ``blobleases: error: ...``, no traceback, no internal error."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blobleases: error: "), done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    return lines[0]


def terminal_env() -> dict[str, str]:
    """This environment as a 100x40 colour terminal sees it, with no
    ``$BLOBLEASES_STORE`` and no ``$NO_COLOR``."""
    env = dict(os.environ)
    env.pop("BLOBLEASES_STORE", None)
    env.pop("NO_COLOR", None)
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="40")
    return env


def run_on_pty(
    argv: list[str], stdout: IO[bytes] | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run ``argv`` in :func:`terminal_env` with stdin and stderr (and stdout,
    unless given) on a pseudo-terminal; its exit status and everything the
    terminal received."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdin=follower,
        stdout=follower if stdout is None else stdout,
        stderr=follower,
        env=terminal_env(),
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError as exc:  # EIO: every writer closed the terminal
                if exc.errno == errno.EIO:
                    break
                raise
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")
