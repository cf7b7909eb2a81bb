"""DirectoryStorage's index as the engine's :class:`~blobleases.engine.EndAdapter`:
the verbs that end one lease or one reader hold keep the guarantees the
protocol states, over a real store (real SQLite, real files)."""

from __future__ import annotations

from pathlib import Path

from blobleases import LeaseId
from blobleases.directory import DirectoryStorage
from blobleases.directory.index import _IndexRoom


def test_remove_lease_says_whether_it_left_the_content_unreferenced(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "s")
    try:
        first, second = LeaseId.new(), LeaseId.new()
        cid = storage.store_bytes(b"two leases", first)
        storage.lease_by_content(cid, second)
        key = str(cid)
        with storage._write() as tx:
            room = _IndexRoom(storage, tx)
            assert room.remove_lease(key, first) is False  # ``second`` still holds it
            assert room.remove_lease(key, first) is False  # not held: a no-op
            assert room.remove_lease(key, second) is True
            room.delete_if_unreferenced(key)
        assert not storage.contains(cid)
        assert not storage.blob_path(cid).exists()
        assert not storage.verify()
    finally:
        storage.close()


def test_remove_hold_gives_the_key_it_left_unreferenced(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "s")
    try:
        lid = LeaseId.new()
        cid = storage.store_bytes(b"read after its lease went", lid)
        reader = storage.get_reader(cid, lid)
        storage.advise_lease_dropped(lid, cid)
        assert storage.contains(cid)  # the reader holds it
        key = str(cid)
        with storage._write() as tx:
            (hold,) = tx.db.execute("SELECT id FROM holds WHERE cid = ?", (key,)).fetchone()
            room = _IndexRoom(storage, tx)
            assert room.remove_hold(hold) == key
            assert room.remove_hold(hold) is None  # ended already: a no-op
            room.delete_if_unreferenced(key)
        assert reader.read() == b"read after its lease went"  # its view stays
        reader.close()  # its hold is gone: releasing it is a no-op
        assert not storage.contains(cid)
        assert not storage.verify()
    finally:
        storage.close()


def test_ending_the_last_lease_or_hold_retains_or_deletes_per_policy(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "s", retain_bytes=1 << 20)
    try:
        lid = LeaseId.new()
        kept = storage.store_bytes(b"retained after its lease", lid)
        storage.advise_lease_dropped(lid, kept)
        assert storage.why(kept).retained
        reader_lid = LeaseId.new()
        read = storage.store_bytes(b"retained after its reader", reader_lid)
        reader = storage.get_reader(read, reader_lid)
        storage.advise_lease_dropped(reader_lid, read)
        assert not storage.why(read).retained  # the reader still holds it
        reader.close()
        assert storage.why(read).retained
        assert storage.stats().retained_blobs == 2
    finally:
        storage.close()
