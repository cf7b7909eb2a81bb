"""Progress on a terminal: ``blobleases verify`` and ``collect`` on a large
store and ``get`` of a large blob draw a bar (a spinner for collect) on
stderr when it is a terminal, and nothing when the output is piped.

Every command runs as a real program on a real pseudo-terminal (pty), against
a real DirectoryStorage; the screen is what the terminal received."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobleases import BlobManager, DirectoryStorage
from cli_runs import run_on_pty, terminal_env

BLOB = 6 * 1024 * 1024  # above the CLI's 4 MiB progress threshold
BAR = "\u2501"  # the heavy horizontal line rich draws bars with


def _piped(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, env=terminal_env(), timeout=120, check=False)


@pytest.fixture
def big_store(tmp_path: Path) -> tuple[list[str], list[str], list[bytes]]:
    """A store holding two 6 MiB blobs (under detached leases, as the CLI's
    put leaves them): the command prefix, the content ids and the bytes."""
    root = tmp_path / "store"
    blobs = [os.urandom(BLOB), os.urandom(BLOB)]
    with DirectoryStorage(root) as storage:
        cids = [str(BlobManager(storage).store(b, detached=True).content_id) for b in blobs]
    return [sys.executable, "-m", "blobleases", "--store", str(root)], cids, blobs


def test_verify_draws_a_bar_of_the_bytes_rehashed(big_store: tuple) -> None:
    base, _, _ = big_store
    code, screen = run_on_pty([*base, "verify"])
    assert code == 0, screen
    assert "verifying 2 blobs" in screen
    assert BAR in screen
    assert "12.0/12.0 MiB" in screen  # every byte of the store was counted as hashed
    assert "checked 2 blobs: all intact" in screen
    assert "Traceback" not in screen


def test_collect_draws_a_spinner(big_store: tuple) -> None:
    base, _, _ = big_store
    code, screen = run_on_pty([*base, "collect"])
    assert code == 0, screen
    assert "collecting 2 blobs, 12.0 MiB" in screen
    assert "deleted 0 blobs" in screen
    assert "Traceback" not in screen


def test_get_to_stdout_draws_a_bar_on_the_terminal(big_store: tuple, tmp_path: Path) -> None:
    base, cids, blobs = big_store
    target = tmp_path / "out.bin"
    with open(target, "wb") as out:  # `blobleases get CID > out.bin` in a terminal
        code, screen = run_on_pty([*base, "get", cids[0]], stdout=out)
    assert code == 0, screen
    assert f"reading {cids[0][:19]}" in screen
    assert "6.0/6.0 MiB" in screen
    assert target.read_bytes() == blobs[0]  # the bar went to the terminal, not the file


def test_get_onto_the_terminal_itself_draws_no_bar(big_store: tuple) -> None:
    base, cids, _ = big_store
    code, screen = run_on_pty([*base, "get", cids[0]])
    assert code == 0
    assert "reading" not in screen


def test_piped_output_has_no_bar(big_store: tuple) -> None:
    base, cids, blobs = big_store
    for args in (["verify"], ["collect"], ["verify", "--repair"]):
        proc = _piped([*base, *args])
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == b"", args
        text = proc.stdout.decode()
        assert BAR not in text and "\x1b[" not in text and "verifying" not in text, args
    got = _piped([*base, "get", cids[1]])
    assert got.returncode == 0
    assert got.stdout == blobs[1]
    assert got.stderr == b""


def test_a_small_store_draws_no_bar_even_on_a_terminal(tmp_path: Path) -> None:
    root = tmp_path / "small"
    with DirectoryStorage(root) as storage:
        BlobManager(storage).store(b"a small blob", detached=True)
    base = [sys.executable, "-m", "blobleases", "--store", str(root)]
    for command in ("verify", "collect"):
        code, screen = run_on_pty([*base, command])
        assert code == 0, screen
        assert BAR not in screen and "verifying" not in screen and "collecting" not in screen


def test_observe_hashing_counts_the_bytes_verify_rehashes() -> None:
    from blobleases import ContentId, MemoryStorage
    from blobleases.content_id import observe_hashing

    seen: list[int] = []
    with MemoryStorage() as storage:
        manager = BlobManager(storage)
        leases = [manager.store(b"x" * 1000), manager.store(b"y" * 234)]
        with observe_hashing(seen.append):
            assert not storage.verify()
        assert sum(seen) == 1234
        seen.clear()
        ContentId.for_bytes(b"outside the block")  # not observed
        assert seen == []
        for lease in leases:
            lease.close()
