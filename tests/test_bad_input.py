"""Bad input gets a ValueError or TypeError naming the argument (issue 12
item 9): numbers too large for a float, pids outside the pid range, store
paths too deep or not UTF-8, through the API and through the CLI."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from blobleases import (
    BlobManager,
    ContentId,
    DirectoryStorage,
    InvalidLeaseId,
    LeaseId,
    MemoryStorage,
    open_storage,
)
from cli_runs import one_error_line, run_cli

_HUGE = 10**400  # an int too large for a float


# == numbers ===============================================================================


@pytest.mark.parametrize("name", ["reap_interval", "transfer_ttl"])
@pytest.mark.parametrize("value", [_HUGE, -_HUGE], ids=["huge", "-huge"])
def test_seconds_policies_too_large_for_a_float_name_themselves(
    name: str, value: int, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=name):
        MemoryStorage(**{name: value})
    with pytest.raises(ValueError, match=name):
        DirectoryStorage(tmp_path / "s", **{name: value})
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["max_bytes", "retain_bytes"])
def test_size_policies_beyond_64_bits_name_themselves(name: str, tmp_path: Path) -> None:
    for value in (2**63, _HUGE):
        with pytest.raises(ValueError, match=name):
            MemoryStorage(**{name: value})
        with pytest.raises(ValueError, match=name):
            DirectoryStorage(tmp_path / "s", **{name: value})
    with MemoryStorage(**{name: 2**63 - 1}) as storage:
        assert getattr(storage.policies, name) == 2**63 - 1


def test_ttl_too_large_for_a_float_names_ttl(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s") as storage:
        manager = BlobManager(storage)
        cid = ContentId.for_bytes(b"x")
        with pytest.raises(ValueError, match="ttl"):
            manager.store(b"x", ttl=_HUGE)
        with pytest.raises(ValueError, match="ttl"):
            storage.store(cid, b"x", LeaseId.new(), ttl=_HUGE)
        assert not storage.contains(cid)
        with manager.store(b"x") as lease:
            with pytest.raises(ValueError, match="ttl"):
                storage.lease_by_content(cid, LeaseId.new(), ttl=_HUGE)
            assert storage.stat(cid).lease_count == 1
            assert lease.get_data() == b"x"
        # A finite but enormous ttl is a lease that never expires in practice.
        with manager.store(b"y", ttl=1e300) as lease:
            assert lease.get_data() == b"y"
        assert not storage.verify()


# == pids ==================================================================================


@pytest.mark.parametrize("pid", [2**31, 10**30, _HUGE], ids=["2**31", "10**30", "huge"])
def test_lease_id_rejects_pids_beyond_the_pid_range(pid: int) -> None:
    with pytest.raises(ValueError, match="pid"):
        LeaseId(uuid.uuid4(), pid)
    with pytest.raises(ValueError, match="pid"):
        LeaseId.new(pid)
    with MemoryStorage() as storage, pytest.raises(ValueError, match="pid"):
        storage.advise_of_pid(pid)


def test_lease_id_accepts_the_largest_pid_and_parse_rejects_beyond() -> None:
    lid = LeaseId(uuid.uuid4(), 2**31 - 1)
    assert LeaseId.parse(str(lid)) == lid
    text = f"lease:pid={2**31},{uuid.uuid4()}"
    with pytest.raises(InvalidLeaseId, match="pid"):
        LeaseId.parse(text)


def test_pid_beyond_the_range_in_a_directory_store(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s") as storage:
        with pytest.raises(ValueError, match="pid"):
            storage.advise_pid_terminated(10**30)
        assert not storage.verify()


def test_cli_drop_of_a_lease_id_beyond_the_pid_range(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s"):
        pass
    line = one_error_line(
        run_cli("--store", str(tmp_path / "s"), "drop", f"lease:pid={2**31},{uuid.uuid4()}")
    )
    assert "invalid lease id" in line and "2**31 - 1" in line


# == store paths ===========================================================================


def test_store_path_too_deep_is_a_value_error_naming_it(tmp_path: Path) -> None:
    deep = tmp_path / "deep" / ("a/" * 2000)
    with pytest.raises(ValueError, match="path") as info:
        DirectoryStorage(deep)
    assert str(tmp_path) in str(info.value)
    assert not (tmp_path / "deep").exists()
    with pytest.raises(ValueError, match="path"):
        open_storage("file://" + str(deep))
    line = one_error_line(run_cli("--store", str(deep), "stats"))
    assert "deep" in line
    assert not (tmp_path / "deep").exists()


def test_store_path_not_utf8_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "s\udcff")
    with pytest.raises(ValueError, match="path") as info:
        DirectoryStorage(path)
    assert repr(path) in str(info.value)
    with pytest.raises(ValueError, match="path"):
        open_storage("file://" + str(tmp_path) + "/s%FF")
    assert os.listdir(tmp_path) == []
    line = one_error_line(run_cli("--store", path, "stats"))
    assert "UTF-8" in line
    assert os.listdir(tmp_path) == []


def test_store_path_with_nul_is_a_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="path"):
        DirectoryStorage(str(tmp_path / "a\0b"))


def test_reasonably_deep_utf8_path_still_works(tmp_path: Path) -> None:
    root: Any = tmp_path / ("d/" * 100) / "stoöre"
    with DirectoryStorage(root) as storage:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"deep", lid)
        again = open_storage(storage.url)
        try:
            assert again.get_data(cid, lid) == b"deep"
        finally:
            again.close()
