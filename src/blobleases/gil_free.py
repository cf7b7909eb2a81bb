"""Copies of large buffers that release the GIL.

CPython copies a buffer (``bytes(view)``, ``view.tobytes()``, ``target[:n] =
view``, a slice of ``bytes``) holding the GIL throughout: 16 MiB take 5 to
50 ms (more on a loaded machine, where page faults on the new memory and the
memory bus are slow), and for all that time no other thread runs Python
code: an asyncio loop whose worker thread copies a blob stalls for the whole
copy. Here the copy is one ``memcpy`` made through ``ctypes.memmove``, which
releases the GIL for the call like any foreign function ctypes calls;
the GIL is held only to get the buffers' addresses (a few microseconds).

Copies shorter than :data:`MIN_LENGTH` are made the ordinary way: releasing
and taking the GIL back costs more than they do.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["MIN_LENGTH", "copy_into", "to_bytes"]

#: The shortest copy made with the GIL released (a copy this long takes
#: 20 to 250 us with the GIL held).
MIN_LENGTH = 1 << 18


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),  # a reference PyBuffer_Release drops: not a py_object
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyBUF_SIMPLE = 0
_PyBUF_WRITABLE = 1

# ctypes.pythonapi calls hold the GIL, as these must.
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytes.restype = ctypes.py_object
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.argtypes = [ctypes.py_object]
_bytes_address.restype = ctypes.c_void_p


class _Exported:
    """A contiguous buffer's address, exported (so neither freed, moved nor
    unmapped: ``mmap.close`` raises BufferError) until the block ends."""

    __slots__ = ("_view", "address", "length")

    def __init__(self, obj: Any, flags: int) -> None:
        self._view = _PyBuffer()
        # Raises BufferError for a buffer that is not C-contiguous (or, with
        # _PyBUF_WRITABLE, read-only), TypeError for no buffer at all.
        _get_buffer(obj, ctypes.byref(self._view), flags)
        self.address = self._view.buf or 0
        self.length = self._view.len

    def __enter__(self) -> _Exported:
        return self

    def __exit__(self, *exc: object) -> None:
        _release_buffer(ctypes.byref(self._view))


def to_bytes(source: Any) -> bytes:
    """A new ``bytes`` holding a copy of the contiguous buffer ``source``
    (what ``bytes(source)`` gives), copied with the GIL released when it is
    at least :data:`MIN_LENGTH` long."""
    if memoryview(source).nbytes < MIN_LENGTH:
        return bytes(source)
    with _Exported(source, _PyBUF_SIMPLE) as src:
        # Not yet seen by any other code, so filling it in is no mutation
        # anyone can observe (what C code making a bytes object does).
        data: bytes = _new_bytes(None, src.length)
        ctypes.memmove(_bytes_address(data), src.address, src.length)
    return data


def copy_into(target: Any, source: Any) -> None:
    """Copy the contiguous buffer ``source`` into the writable contiguous
    buffer ``target`` of the same length (``target[:] = source``), with
    the GIL released when it is at least :data:`MIN_LENGTH` long."""
    length = memoryview(source).nbytes
    if length != memoryview(target).nbytes:
        raise ValueError(
            f"target holds {memoryview(target).nbytes} bytes, source {length}: they must match"
        )
    if length < MIN_LENGTH:
        memoryview(target).cast("B")[:] = memoryview(source).cast("B")
        return
    with _Exported(source, _PyBUF_SIMPLE) as src, _Exported(target, _PyBUF_WRITABLE) as dst:
        ctypes.memmove(dst.address, src.address, length)
