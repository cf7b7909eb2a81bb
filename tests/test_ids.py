"""ContentId and LeaseId: canonical text, strict parsing, hashing without copies."""

from __future__ import annotations

import hashlib
import io
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobleases import ContentId, InvalidContentId, InvalidLeaseId, LeaseId

EMPTY = "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_empty_bytes_prints_canonically() -> None:
    cid = ContentId.for_bytes(b"")
    assert str(cid) == EMPTY
    assert cid.algorithm == "sha256"
    assert cid.hex == EMPTY[7:] and len(cid.hex) == 64
    assert cid.digest == hashlib.sha256(b"").digest()


def test_leading_zero_digest_keeps_64_digits() -> None:
    digest = bytes(3) + bytes(range(29))
    cid = ContentId("sha256", digest)
    assert str(cid) == "sha256-000000" + bytes(range(29)).hex()
    assert len(cid.hex) == 64
    assert ContentId.parse(str(cid)) == cid


def test_real_digest_starting_with_zero_byte() -> None:
    data = next(
        i.to_bytes(4, "little")
        for i in range(100_000)
        if hashlib.sha256(i.to_bytes(4, "little")).digest()[0] == 0
    )
    cid = ContentId.for_bytes(data)
    assert str(cid).startswith("sha256-00") and len(str(cid)) == 7 + 64
    assert ContentId.parse(str(cid)) == cid


def test_parse_accepts_colon_and_either_case() -> None:
    cid = ContentId.for_bytes(b"x")
    assert ContentId.parse(f"sha256:{cid.hex}") == cid
    assert ContentId.parse(f"sha256-{cid.hex.upper()}") == cid
    assert ContentId.parse(f"sha256:{cid.hex.upper()}") == cid


@pytest.mark.parametrize(
    "text",
    [
        "sha256-xyz",
        "../etc/passwd",
        "sha256-" + "a" * 63,
        "sha256-" + "a" * 65,
        "sha256-" + "g" * 64,
        " sha256-" + "a" * 64,
        "sha256-" + "a" * 64 + "\n",
        "SHA256-" + "a" * 64,
        "md5-" + "a" * 64,
        "sha256" + "a" * 64,
        "",
    ],
)
def test_parse_rejects_bad_text_naming_it(text: str) -> None:
    with pytest.raises(InvalidContentId) as info:
        ContentId.parse(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, 12, b"sha256-" + b"a" * 64])
def test_parse_rejects_non_str_with_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        ContentId.parse(value)  # type: ignore[arg-type]


def test_for_bytes_accepts_bytes_like_without_copy() -> None:
    data = b"hello world" * 1000
    expected = ContentId.for_bytes(data)
    assert ContentId.for_bytes(bytearray(data)) == expected
    assert ContentId.for_bytes(memoryview(data)) == expected
    with pytest.raises(TypeError, match="data"):
        ContentId.for_bytes("text")
    with pytest.raises(TypeError, match="data"):
        ContentId.for_bytes(12)


def test_for_bytes_numpy_array() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(10_000, dtype=np.float64).reshape(100, 100)
    assert ContentId.for_bytes(array) == ContentId.for_bytes(array.tobytes())
    with pytest.raises(ValueError, match="contiguous"):
        ContentId.for_bytes(array[:, ::2])


def test_for_file_streams_paths_and_file_objects(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 20_000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = ContentId.for_bytes(data)
    assert ContentId.for_file(path) == expected
    assert ContentId.for_file(str(path)) == expected
    assert ContentId.for_file(io.BytesIO(data)) == expected
    with open(path, "rb") as f:
        assert ContentId.for_file(f) == expected
    with pytest.raises(TypeError, match="source"):
        ContentId.for_file(12)  # type: ignore[arg-type]


def test_blake3_ids() -> None:
    blake3 = pytest.importorskip("blake3")
    cid = ContentId.for_bytes(b"abc", "blake3")
    assert cid.digest == blake3.blake3(b"abc").digest()
    assert str(cid).startswith("blake3-")
    assert ContentId.parse(str(cid)) == cid
    assert ContentId.parse("blake3:" + cid.hex) == cid
    assert cid != ContentId("sha256", cid.digest)


def test_unknown_algorithm_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        ContentId.for_bytes(b"x", "md5")
    with pytest.raises(ValueError, match="digest"):
        ContentId("sha256", b"short")


def test_content_id_is_frozen_hashable_ordered_picklable() -> None:
    a, b = ContentId.for_bytes(b"a"), ContentId.for_bytes(b"b")
    assert len({a, b, ContentId.parse(str(a))}) == 2
    assert sorted([b, a]) == sorted([a, b])
    assert (a < b) != (b < a)
    with pytest.raises(AttributeError):
        a.digest = b"x" * 32  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(a)) == a


@given(st.binary(min_size=32, max_size=32), st.sampled_from(["sha256", "blake3"]))
def test_str_always_round_trips(digest: bytes, algorithm: str) -> None:
    cid = ContentId(algorithm, digest)
    text = str(cid)
    assert len(text) == len(algorithm) + 1 + 64
    assert ContentId.parse(text) == cid


def test_lease_id_text_round_trips() -> None:
    lid = LeaseId.new()
    assert lid.pid > 0
    assert lid.uuid.version == 4
    text = str(lid)
    assert text == f"lease:pid={lid.pid},{lid.uuid}"
    assert LeaseId.parse(text) == lid
    other = LeaseId.new(pid=4242)
    assert other.pid == 4242 and LeaseId.parse(str(other)) == other
    assert len({lid, LeaseId.parse(text), other}) == 2


# A fixed uuid keeps the test ids the same in every collection (pytest-xdist).
_FIXED_UUID = "2f1f20e4-23b0-403a-af81-b1cb8e831ca8"


@pytest.mark.parametrize(
    "text",
    [
        "lease:pid=0," + _FIXED_UUID,
        "lease:pid=-1," + _FIXED_UUID,
        "lease:pid=12",
        "lease:pid=12,not-a-uuid",
        "pid=12," + _FIXED_UUID,
        " lease:pid=12," + _FIXED_UUID,
        "",
    ],
)
def test_lease_id_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(InvalidLeaseId, match="lease id"):
        LeaseId.parse(text)


def test_lease_id_validates_pid() -> None:
    with pytest.raises(ValueError, match="pid"):
        LeaseId.new(pid=0)
    with pytest.raises(ValueError, match="pid"):
        LeaseId.new(pid="12")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LeaseId.parse(None)  # type: ignore[arg-type]
