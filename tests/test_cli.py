"""The command line, run as a real program against a real DirectoryStorage.

Every test starts ``python -m blobleases`` (or the installed ``blobleases``
script) in a subprocess with ``--store`` (or ``$BLOBLEASES_STORE``) naming a
directory store under ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import blobleases
from blobleases import ContentId, DirectoryStorage
from cli_runs import run_on_pty

COMMANDS = [
    "put",
    "get",
    "cat",
    "ls",
    "stat",
    "leases",
    "drop",
    "collect",
    "verify",
    "stats",
    "demo",
    "why",
    "top",
    "metrics",
]
ABSENT_CID = "sha256-" + "0" * 64


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BLOBLEASES_STORE", None)
    env["COLUMNS"] = "120"
    env.update(extra)
    return env


def cli(
    *args: str,
    store: Path | str | None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m blobleases [--store STORE] ARGS`` and capture its output."""
    prefix = [] if store is None else ["--store", str(store)]
    return subprocess.run(
        [sys.executable, "-m", "blobleases", *prefix, *args],
        input=input,
        capture_output=True,
        env=env or _env(),
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The stdout of a run that must have succeeded without a word on stderr."""
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode(errors="replace"))
    assert b"Traceback" not in proc.stderr
    return proc.stdout.decode()


def ok_json(proc: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(ok(proc))


def assert_user_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Exit 1, exactly one line on stderr that names the problem, no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err and b"Traceback" not in proc.stdout
    assert err.endswith("\n") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.bin"
    path.write_bytes(os.urandom(3000))
    return path


def put(store: Path, *files: Path | str, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    result = ok_json(cli("--json", "put", *extra, *map(str, files), store=store))
    assert isinstance(result, list)
    return result


# -- version, help ------------------------------------------------------------


def test_version() -> None:
    proc = cli("--version", store=None)
    assert ok(proc) == f"blobleases {blobleases.__version__}\n"


def test_console_script_runs(store: Path, sample: Path) -> None:
    # where pip put this interpreter's scripts: its scheme (beside it in a
    # venv, /usr/local/bin for a system python), else the user scheme
    places = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    found = [
        Path(place) / "blobleases" for place in places if (Path(place) / "blobleases").exists()
    ]
    if not found:
        reason = f"the blobleases console script is not in {places}"
        if os.environ.get("CI"):
            pytest.fail(reason)  # scripts/test.sh installs it
        pytest.skip(reason)
    script = found[0]
    proc = subprocess.run(
        [str(script), "--store", str(store), "put", str(sample)],
        capture_output=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    cid, lid, name = ok(proc).split()
    assert cid == str(ContentId.for_file(sample))
    assert lid.startswith("lease:pid=") and name == str(sample)
    version = subprocess.run([str(script), "--version"], capture_output=True, check=False)
    assert ok(version).startswith("blobleases ")


def test_help_lists_every_command_and_examples() -> None:
    text = ok(cli("--help", store=None))
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", text, re.MULTILINE), command
    assert "Examples:" in text and "blobleases demo" in text
    for option in ("--store", "--json", "--debug", "--version"):
        assert option in text
    assert ok(cli(store=None)) == text  # no arguments: the help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command: str) -> None:
    text = ok(cli(command, "--help", store=None))
    assert f"Usage: blobleases {command}" in text
    assert "--json" in text


# -- put, get, cat --------------------------------------------------------------


def test_put_get_cat_round_trip_50_mib(store: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = os.urandom(50 * 1024 * 1024)
    source.write_bytes(data)
    out = ok(cli("put", str(source), store=store))
    cid, lid, name = out.split()
    assert cid == str(ContentId.for_bytes(data))
    assert lid.startswith("lease:pid=") and name == str(source)

    target_dir = tmp_path / "out"
    target_dir.mkdir()
    target = target_dir / "copy.bin"
    ok(cli("get", cid, "-o", str(target), store=store))
    assert target.read_bytes() == data
    assert os.listdir(target_dir) == ["copy.bin"]  # no temporary file left behind

    assert cli("cat", cid, store=store).stdout == data
    assert cli("get", cid, store=store).stdout == data  # no -o: standard output
    # get/cat/stat hold a lease only while they read: one lease is left, put's.
    held = ok_json(cli("--json", "leases", store=store))
    assert [h["lease_id"] for h in held] == [lid]


def test_get_replaces_an_existing_file_atomically(
    store: Path, sample: Path, tmp_path: Path
) -> None:
    [entry] = put(store, sample)
    target = tmp_path / "existing.bin"
    target.write_bytes(b"old contents")
    result = ok_json(cli("--json", "get", entry["content_id"], "-o", str(target), store=store))
    assert result == {
        "content_id": entry["content_id"],
        "size": 3000,
        "output": str(target),
    }
    assert target.read_bytes() == sample.read_bytes()


def test_put_stdin_and_several_files(store: Path, sample: Path, tmp_path: Path) -> None:
    data = os.urandom(5000)
    proc = cli("put", "-", store=store, input=data)
    cid, _lid, name = ok(proc).split()
    assert cid == str(ContentId.for_bytes(data)) and name == "-"

    other = tmp_path / "other.bin"
    other.write_bytes(b"other")
    entries = put(store, sample, other, sample)
    assert [e["file"] for e in entries] == [str(sample), str(other), str(sample)]
    assert entries[0]["content_id"] == entries[2]["content_id"]
    assert entries[0]["lease_id"] != entries[2]["lease_id"]
    assert [e["size"] for e in entries] == [3000, 5, 3000]
    stats = ok_json(cli("stats", "--json", store=store))
    assert stats["blobs"] == 3 and stats["leases"] == 4 and stats["dedup_hits"] == 1


def test_put_ttl_makes_a_detached_expiring_lease(store: Path, sample: Path) -> None:
    before = time.time()
    [entry] = put(store, sample, extra=("--ttl", "10m"))
    assert before + 590 < entry["expires_at"] < time.time() + 610
    [lease] = ok_json(cli("leases", "--json", store=store))
    assert lease["lease_id"] == entry["lease_id"]
    assert lease["detached"] is True
    assert abs(lease["expires_at"] - entry["expires_at"]) < 5
    text = ok(cli("leases", store=store))
    assert entry["lease_id"] in text
    assert "in 9m" in text or "in 10m" in text


def test_expired_put_lease_frees_its_content(store: Path, sample: Path) -> None:
    [entry] = put(store, sample, extra=("--ttl", "1s"))
    time.sleep(1.2)
    report = ok_json(cli("--json", "collect", store=store))
    assert report["blobs_deleted"] == 1 and report["bytes_freed"] == 3000
    assert ok_json(cli("ls", "--json", store=store)) == []
    assert_user_error(cli("get", entry["content_id"], store=store), entry["content_id"])


def test_store_from_environment(tmp_path: Path, sample: Path) -> None:
    env = _env(BLOBLEASES_STORE=str(tmp_path / "env-store"))
    ok(cli("put", str(sample), store=None, env=env))
    listed = json.loads(ok(cli("ls", "--json", store=None, env=env)))
    assert [b["content_id"] for b in listed] == [str(ContentId.for_file(sample))]
    assert (tmp_path / "env-store").is_dir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_CACHE_HOME is Linux's")
def test_default_store_is_the_user_cache_directory(tmp_path: Path, sample: Path) -> None:
    env = _env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    ok(cli("put", str(sample), store=None, env=env))
    stats = json.loads(ok(cli("stats", "--json", store=None, env=env)))
    assert stats["store"].endswith(str(tmp_path / "cache" / "blobleases"))
    assert stats["blobs"] == 1


def test_command_options_may_follow_the_command(store: Path, sample: Path) -> None:
    put(store, sample)
    proc = subprocess.run(
        [sys.executable, "-m", "blobleases", "ls", "--store", str(store), "--json"],
        capture_output=True,
        env=_env(),
        check=False,
    )
    assert len(ok_json(proc)) == 1


# -- ls, stat, leases, stats ------------------------------------------------------


def test_ls_sorted_human_and_json(store: Path, tmp_path: Path) -> None:
    sizes = [10, 2048, 3 * 1024 * 1024]
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        put(store, path)
    listed = ok_json(cli("ls", "--json", store=store))
    ids = [b["content_id"] for b in listed]
    assert ids == sorted(ids) and len(ids) == 3
    for blob in listed:
        assert set(blob) >= {"content_id", "size", "leases", "readers", "created"}
        assert blob["leases"] == 1 and blob["readers"] == 0
    assert sorted(b["size"] for b in listed) == sizes
    by_size = ok_json(cli("ls", "--json", "--sort", "size", store=store))
    assert [b["size"] for b in by_size] == sizes

    text = ok(cli("ls", store=store))
    lines = [line for line in text.splitlines() if line.startswith("sha256-")]
    assert [line.split()[0] for line in lines] == ids
    assert "10 B" in text and "2.0 KiB" in text and "3.0 MiB" in text
    assert "3 blobs" in text


def test_ls_and_leases_of_an_empty_store(store: Path) -> None:
    DirectoryStorage(store).close()
    assert ok_json(cli("ls", "--json", store=store)) == []
    assert ok_json(cli("leases", "--json", store=store)) == []
    assert "no blobs" in ok(cli("ls", store=store))
    assert "no leases" in ok(cli("leases", store=store))


def test_stat(store: Path, sample: Path) -> None:
    [entry] = put(store, sample)
    cid = entry["content_id"]
    info = ok_json(cli("stat", cid, "--json", store=store))
    with DirectoryStorage(store) as storage:
        path = storage.blob_path(ContentId.parse(cid))
    assert info["content_id"] == cid and info["size"] == 3000
    assert info["leases"] == 1  # put's lease; not the one stat holds while it looks
    assert info["lease_ids"] == [entry["lease_id"]]
    assert info["path"] == str(path) and path.is_file()
    text = ok(cli("stat", cid.replace("-", ":", 1), store=store))  # sha256:<hex> works too
    assert cid in text and "3000 bytes" in text and entry["lease_id"] in text
    # stat's own lease is gone again
    assert len(ok_json(cli("leases", "--json", store=store))) == 1


def test_leases_filtered_by_pid(store: Path, sample: Path, tmp_path: Path) -> None:
    [first] = put(store, sample)
    other = tmp_path / "other"
    other.write_bytes(b"x" * 100)
    [second] = put(store, other)
    pid = int(first["lease_id"].split("=")[1].split(",")[0])
    mine = ok_json(cli("leases", "--pid", str(pid), "--json", store=store))
    assert [h["lease_id"] for h in mine] == [first["lease_id"]]
    assert mine[0]["pid"] == pid and mine[0]["content_id"] == first["content_id"]
    assert mine[0]["expires_at"] is None and mine[0]["detached"] is True
    both = ok_json(cli("leases", "--json", store=store))
    assert {h["lease_id"] for h in both} == {first["lease_id"], second["lease_id"]}
    text = ok(cli("leases", "--pid", str(pid), store=store))
    assert first["lease_id"] in text and second["lease_id"] not in text


def test_stats(store: Path, sample: Path) -> None:
    put(store, sample)
    put(store, sample)
    stats = ok_json(cli("stats", "--json", store=store))
    assert stats["blobs"] == 1 and stats["bytes"] == 3000
    assert stats["leases"] == 2 and stats["dedup_hits"] == 1
    assert stats["store"].endswith(str(store))
    text = ok(cli("stats", store=store))
    assert "dedup hits" in text and "3000" in text


# -- drop, collect, verify ------------------------------------------------------


def test_drop_then_collect_frees_the_blob(store: Path, sample: Path) -> None:
    [a] = put(store, sample)
    [b] = put(store, sample)
    cid = a["content_id"]
    with DirectoryStorage(store) as storage:
        path = storage.blob_path(ContentId.parse(cid))
    assert path.is_file()

    text = ok(cli("drop", a["lease_id"], store=store))
    assert a["lease_id"] in text and "still held" in text
    assert path.is_file()

    result = ok_json(cli("--json", "drop", b["lease_id"], store=store))
    assert result == {
        "lease_id": b["lease_id"],
        "dropped": [{"content_id": cid, "content_deleted": True}],
    }
    report = ok_json(cli("collect", "--json", store=store))
    assert set(report) >= {"leases_reaped", "blobs_deleted", "bytes_freed"}
    assert "reaped" in ok(cli("collect", store=store))
    assert not path.exists()
    assert ok_json(cli("ls", "--json", store=store)) == []
    assert ok_json(cli("stats", "--json", store=store))["blobs"] == 0
    assert_user_error(cli("get", cid, store=store), "not found", cid)


def test_collect_reaps_a_killed_process(store: Path, sample: Path) -> None:
    """A lease of a process that was SIGKILLed is reaped by `collect`."""
    code = (
        "import sys, time; from blobleases import DirectoryStorage, BlobManager; "
        "s = DirectoryStorage(sys.argv[1]); "
        "lease = BlobManager(s).store(b'held by a doomed process'); "
        "print(lease.content_id, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, env=_env()
    )
    try:
        assert proc.stdout is not None
        cid = proc.stdout.readline().decode().strip()
        assert len(ok_json(cli("leases", "--pid", str(proc.pid), "--json", store=store))) == 1
    finally:
        proc.kill()
        proc.wait()
    report = ok_json(cli("collect", "--json", store=store))
    assert report["bytes_freed"] == len(b"held by a doomed process") or not any(
        b["content_id"] == cid for b in ok_json(cli("ls", "--json", store=store))
    )
    assert ok_json(cli("leases", "--json", store=store)) == []
    assert ok_json(cli("ls", "--json", store=store)) == []


def test_verify_finds_corruption_and_repair_removes_it(store: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(os.urandom(4096))
    bad.write_bytes(os.urandom(4096))
    [g] = put(store, good)
    [b] = put(store, bad)
    clean = ok_json(cli("verify", "--json", store=store))
    assert clean["ok"] is True and clean["checked"] == 2 and clean["corrupted"] == []
    assert "all intact" in ok(cli("verify", store=store))

    with DirectoryStorage(store) as storage:
        path = storage.blob_path(ContentId.parse(b["content_id"]))
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:  # same size, different bytes
        f.seek(100)
        f.write(b"\x00" * 64)

    found = cli("verify", "--json", store=store)
    assert found.returncode == 1 and b"Traceback" not in found.stderr
    report = json.loads(found.stdout)
    assert report["ok"] is False and report["corrupted"] == [b["content_id"]]
    assert report["repaired"] is False
    human = cli("verify", store=store)
    assert human.returncode == 1 and f"corrupted  {b['content_id']}" in human.stdout.decode()
    assert "--repair" in human.stdout.decode()
    # A read of corrupted content fails cleanly, never with wrong bytes on a file.
    target = tmp_path / "never.bin"
    proc = cli("get", b["content_id"], "-o", str(target), store=store)
    assert_user_error(proc, b["content_id"])
    assert not target.exists() and os.listdir(tmp_path).count("never.bin") == 0

    repaired = ok_json(cli("verify", "--repair", "--json", store=store))
    assert repaired["corrupted"] == [b["content_id"]] and repaired["repaired"] is True
    assert not path.exists()
    assert ok_json(cli("verify", "--json", store=store))["ok"] is True
    assert [x["content_id"] for x in ok_json(cli("ls", "--json", store=store))] == [g["content_id"]]
    assert_user_error(cli("cat", b["content_id"], store=store), b["content_id"])
    assert cli("cat", g["content_id"], store=store).stdout == good.read_bytes()


def test_every_command_has_json_output(store: Path, sample: Path, tmp_path: Path) -> None:
    [entry] = put(store, sample)
    cid, lid = entry["content_id"], entry["lease_id"]
    runs = {
        "get": ["get", cid],
        "get -o": ["get", cid, "-o", str(tmp_path / "o")],
        "cat": ["cat", cid],
        "ls": ["ls"],
        "stat": ["stat", cid],
        "leases": ["leases"],
        "stats": ["stats"],
        "collect": ["collect"],
        "verify": ["verify"],
        "drop": ["drop", lid],
    }
    for i, (name, args) in enumerate(runs.items()):
        # --json works before the command (a global option) and after it
        argv = ["--json", *args] if i % 2 else [*args, "--json"]
        value = ok_json(cli(*argv, store=store))
        assert isinstance(value, (dict, list)), name
    got = ok_json(cli("put", str(sample), "--json", store=store))
    data = ok_json(cli("cat", got[0]["content_id"], "--json", store=store))
    assert base64.b64decode(data["data"]) == sample.read_bytes()
    assert data["encoding"] == "base64" and data["size"] == 3000


# -- errors -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_error_unknown_content_id(store: Path, sample: Path) -> None:
    put(store, sample)
    for command in ("get", "cat", "stat"):
        assert_user_error(cli(command, ABSENT_CID, store=store), "not found", ABSENT_CID)
    err = assert_user_error(cli("--json", "get", ABSENT_CID, store=store), ABSENT_CID)
    assert err.startswith("blobleases: error:")


@pytest.mark.parametrize("bad", ["nothex", "sha256-xyz", "sha256-" + "0" * 63, "md5-" + "0" * 64])
def test_error_malformed_content_id(store: Path, bad: str) -> None:
    for command in ("get", "cat", "stat"):
        proc = cli(command, bad, store=store)
        assert_user_error(proc, "invalid content id", repr(bad))
        assert proc.stdout == b""


def test_error_missing_file(store: Path, sample: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file.bin"
    assert_user_error(cli("put", str(missing), store=store), "no such file", str(missing))
    # nothing was stored, not even the good file named before the missing one
    assert_user_error(cli("put", str(sample), str(missing), store=store), str(missing))
    assert not store.exists()  # checked before the store was even created
    assert_user_error(cli("put", str(tmp_path), store=store), "is a directory")


def test_error_get_into_a_missing_directory(store: Path, sample: Path, tmp_path: Path) -> None:
    [entry] = put(store, sample)
    target = tmp_path / "no-dir" / "out.bin"
    assert_user_error(cli("get", entry["content_id"], "-o", str(target), store=store), str(target))


def test_error_unusable_store_path(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    assert_user_error(cli("ls", store=a_file), "cannot open store", str(a_file), "not a directory")
    below = a_file / "sub"
    assert_user_error(cli("ls", store=below), "cannot open store", str(below))
    shared = tmp_path / "world-writable"
    shared.mkdir()
    shared.chmod(0o777)
    assert_user_error(cli("stats", store=shared), "cannot open store", str(shared), "writable")
    assert_user_error(cli("ls", store="bogus://x"), "cannot open store", "unknown scheme")


def test_error_redis_url_that_does_not_answer() -> None:
    url = f"redis://127.0.0.1:{_free_port()}"
    assert_user_error(cli("ls", store=url, timeout=60), url)
    assert_user_error(cli("stats", "--json", store=url, timeout=60), url)


def test_error_unknown_and_malformed_lease(store: Path, sample: Path) -> None:
    put(store, sample)
    unknown = f"lease:pid=12345,{uuid.uuid4()}"
    assert_user_error(cli("drop", unknown, store=store), "no such lease", unknown)
    assert_user_error(cli("drop", "lease:nonsense", store=store), "invalid lease id")
    assert len(ok_json(cli("leases", "--json", store=store))) == 1  # nothing dropped


def test_usage_errors_exit_2_without_traceback(store: Path, sample: Path) -> None:
    for args in (
        ["get"],
        ["no-such-command"],
        ["put"],
        ["put", "--ttl", "soon", str(sample)],
        ["put", "--ttl", "0", str(sample)],
        ["leases", "--pid", "0"],
        ["ls", "--sort", "colour"],
        ["demo", "--workers", "1"],
    ):
        proc = cli(*args, store=store)
        err = proc.stderr.decode()
        assert proc.returncode == 2, (args, err)
        assert "Traceback" not in err and "Error:" in err and "Usage:" in err, (args, err)


def test_debug_shows_the_traceback(store: Path) -> None:
    DirectoryStorage(store).close()
    proc = cli("--debug", "get", ABSENT_CID, store=store)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "Traceback" in err and "ContentNotFound" in err
    assert err.splitlines()[-1].startswith("blobleases: error: content not found")


def test_closed_output_pipe_is_quiet(store: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 * 1024 * 1024))
    [entry] = put(store, big)
    proc = subprocess.Popen(
        [sys.executable, "-m", "blobleases", "--store", str(store), "cat", entry["content_id"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert b"Traceback" not in err and b"Exception" not in err, err
    # the lease cat held while reading is gone
    assert len(ok_json(cli("leases", "--json", store=store))) == 1


# -- progress bar -----------------------------------------------------------------


def test_progress_bar_on_a_terminal_not_when_piped(store: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    base = [sys.executable, "-m", "blobleases", "--store", str(store)]

    code, screen = run_on_pty([*base, "put", str(big)])
    assert code == 0, screen
    assert "storing big.bin" in screen and "MiB" in screen
    assert "Traceback" not in screen
    cid = str(ContentId.for_file(big))
    assert cid in screen

    target = tmp_path / "copy.bin"
    code, screen = run_on_pty([*base, "get", cid, "-o", str(target)])
    assert code == 0, screen
    assert "writing copy.bin" in screen
    assert target.read_bytes() == big.read_bytes()

    piped = cli("put", str(big), store=store)
    assert ok(piped).split()[0] == cid
    assert piped.stderr == b""  # no progress bar, nothing at all on stderr
    assert "storing" not in piped.stdout.decode()
    piped_get = cli("get", cid, "-o", str(tmp_path / "copy2.bin"), store=store)
    ok(piped_get)
    assert piped_get.stderr == b""


def test_small_files_get_no_progress_bar_even_on_a_terminal(store: Path, sample: Path) -> None:
    code, screen = run_on_pty(
        [sys.executable, "-m", "blobleases", "--store", str(store), "put", str(sample)]
    )
    assert code == 0, screen
    assert "storing" not in screen


# -- which commands create a store; read-only stores -------------------------------


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _commands_on(store: Path, cid: str) -> list[list[str]]:
    """Every command but put and demo, as a user would run it."""
    return [
        ["ls"],
        ["stats"],
        ["leases"],
        ["collect"],
        ["verify"],
        ["verify", "--repair"],
        ["stat", cid],
        ["cat", cid],
        ["get", cid, "-o", str(store.parent / "out.bin")],
        ["drop", f"lease:pid=1,{uuid.uuid4()}"],
    ]


def test_only_put_creates_a_store(tmp_path: Path, sample: Path) -> None:
    missing = tmp_path / "typo-store"
    for args in _commands_on(missing, ABSENT_CID):
        err = assert_user_error(cli(*args, store=missing), "no blobleases store", str(missing))
        assert not missing.exists(), (args, err)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    for args in _commands_on(empty, ABSENT_CID):
        assert_user_error(cli(*args, store=empty), "no blobleases store", str(empty))
        assert list(empty.iterdir()) == [], args
    env_store = tmp_path / "from-env"
    assert_user_error(
        cli("stats", store=None, env=_env(BLOBLEASES_STORE=str(env_store))), "no blobleases store"
    )
    assert not env_store.exists()
    [entry] = put(missing, sample)
    assert ok_json(cli("ls", "--json", store=missing))[0]["content_id"] == entry["content_id"]
    [again] = put(empty, sample)
    assert again["content_id"] == entry["content_id"]


def test_a_non_empty_directory_that_is_not_a_store_is_refused(tmp_path: Path, sample: Path) -> None:
    other = tmp_path / "project"
    other.mkdir(mode=0o700)
    (other / "notes.txt").write_text("mine")
    (other / "src").mkdir()
    before = _listing(other)
    for args in (["put", str(sample)], ["ls"], ["stats"]):
        assert_user_error(cli(*args, store=other), "not empty", str(other))
        assert _listing(other) == before, args


_READ_ONLY_DRIVER = r"""
import json, subprocess, sys
store, out = sys.argv[1], sys.argv[2]
runs = []
for args in json.loads(sys.argv[3]):
    proc = subprocess.run([sys.executable, "-m", "blobleases", "--store", store, *args],
                          capture_output=True)
    runs.append([args, proc.returncode, proc.stdout.decode(errors="replace"),
                 proc.stderr.decode(errors="replace")])
print(json.dumps(runs))
"""


def _run_read_only(root: Path, commands: list[list[str]]) -> list[list[Any]]:
    """Run CLI commands against ``root`` made read-only: a read-only bind
    mount in a private mount namespace (as root, who ignores permission
    bits), else permissions (chmod 500)."""
    import shutil

    args = [str(root), str(root.parent), json.dumps(commands)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to make a read-only mount as root")
        script = (
            '{ mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1"; } || exit 77; '
            f'exec {sys.executable} -c "$2" "$1" "$3" "$4"'
        )
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", args[0], _READ_ONLY_DRIVER, *args[1:]],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        if proc.returncode == 77 or (proc.returncode != 0 and proc.stderr.startswith("unshare:")):
            pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()}")
    else:
        root.chmod(0o500)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _READ_ONLY_DRIVER, *args],
                capture_output=True,
                text=True,
                timeout=300,
                env=_env(),
            )
        finally:
            root.chmod(0o700)
    assert proc.returncode == 0, proc.stderr
    runs: list[list[Any]] = json.loads(proc.stdout)
    return runs


def test_a_read_only_store_can_be_listed_read_and_verified(store: Path, tmp_path: Path) -> None:
    data = os.urandom(5000)
    (tmp_path / "a.bin").write_bytes(data)
    [entry] = put(store, tmp_path / "a.bin")
    cid = entry["content_id"]
    before = _listing(store)
    out = tmp_path / "copy.bin"
    commands = [
        ["ls", "--json"],
        ["stat", "--json", cid],
        ["leases", "--json"],
        ["stats", "--json"],
        ["verify", "--json"],
        ["get", cid, "-o", str(out)],
        ["cat", cid],
        ["cat", ABSENT_CID],
        ["verify", "--repair"],
        ["collect"],
        ["drop", entry["lease_id"]],
        ["put", str(tmp_path / "a.bin")],
    ]
    runs = {
        " ".join(args): (rc, stdout, stderr)
        for args, rc, stdout, stderr in _run_read_only(store, commands)
    }

    def good(name: str) -> str:
        rc, stdout, stderr = runs[name]
        assert rc == 0 and "Traceback" not in stderr, (name, rc, stderr)
        return stdout

    assert [b["content_id"] for b in json.loads(good("ls --json"))] == [cid]
    assert json.loads(good(f"stat --json {cid}"))["size"] == 5000
    assert [x["lease_id"] for x in json.loads(good("leases --json"))] == [entry["lease_id"]]
    assert json.loads(good("stats --json"))["blobs"] == 1
    assert json.loads(good("verify --json"))["ok"] is True
    good(f"get {cid} -o {out}")
    assert out.read_bytes() == data
    assert runs[f"cat {cid}"][0] == 0
    for name, needle in [
        (f"cat {ABSENT_CID}", "not found"),
        ("verify --repair", "read-only"),
        ("collect", "read-only"),
        (f"drop {entry['lease_id']}", "read-only"),
        (f"put {tmp_path / 'a.bin'}", "read-only"),
    ]:
        rc, _stdout, stderr = runs[name]
        assert rc == 1 and needle in stderr and stderr.count("\n") == 1, (name, rc, stderr)
    assert _listing(store) == before
    # the lease is intact, the store still writable where it is not mounted read-only
    assert ok(cli("drop", entry["lease_id"], store=store))
