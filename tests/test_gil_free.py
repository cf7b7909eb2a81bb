"""blobleases.gil_free: copies of large buffers with the GIL released give
what the ordinary copy gives, keep their sources exported while they run,
and refuse what they cannot copy, naming the argument."""

from __future__ import annotations

import mmap
import os
import sys

import pytest

from blobleases import gil_free

SIZES = [0, 1, gil_free.MIN_LENGTH - 1, gil_free.MIN_LENGTH, 3 * gil_free.MIN_LENGTH + 7]


@pytest.mark.parametrize("size", SIZES)
def test_to_bytes_is_bytes_of_the_buffer(size: int) -> None:
    data = os.urandom(size)
    mapped = mmap.mmap(-1, max(size, 1))
    mapped[:size] = data
    view = memoryview(mapped)[:size]
    for source in (data, bytearray(data), memoryview(data)[0:], view, view.toreadonly()):
        copy = gil_free.to_bytes(source)
        assert type(copy) is bytes and copy == data
        if size >= gil_free.MIN_LENGTH:  # a new object: this name and the call's argument
            assert copy is not source and sys.getrefcount(copy) == 2
    del source
    view.release()
    mapped.close()  # nothing is still exported


@pytest.mark.parametrize("size", SIZES)
def test_copy_into_fills_the_target(size: int) -> None:
    data = os.urandom(size)
    target = bytearray(size)
    gil_free.copy_into(target, memoryview(data))
    assert target == data
    mapped = mmap.mmap(-1, max(size, 1))
    gil_free.copy_into(memoryview(mapped)[:size], target)
    assert mapped[:size] == data
    mapped.close()


def test_bad_arguments_name_themselves() -> None:
    big = gil_free.MIN_LENGTH
    with pytest.raises(ValueError, match="target holds 5 bytes, source 6"):
        gil_free.copy_into(bytearray(5), b"123456")
    with pytest.raises(BufferError, match="not writable"):
        gil_free.copy_into(bytes(big), bytes(big))
    with pytest.raises(TypeError):
        gil_free.to_bytes("text")
    strided = memoryview(bytearray(2 * big))[::2]
    with pytest.raises(BufferError):
        gil_free.to_bytes(strided)
