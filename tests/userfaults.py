"""Memory whose pages are filled in by Python code when first touched
(Linux userfaultfd), for tests of what may run while another thread copies.

A thread that touches a page not yet filled stops in the kernel until
:meth:`FaultingMemory.resolve` fills it. If that thread holds the GIL (a
copy made in C without releasing it), no Python code can run ``resolve``:
the process hangs. So a copy that completes proves the GIL was free while
it ran, without measuring any time.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable

__all__ = ["FaultingMemory", "userfaultfd_refused"]

_SYSCALL = {"x86_64": 323, "aarch64": 282}
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
_MODE_MISSING = 1
_EVENT_PAGEFAULT = 0x12
_MSG_SIZE = 32
PAGE = mmap.PAGESIZE


def _userfaultfd() -> int:
    number = _SYSCALL.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd syscall number for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"userfaultfd: {os.strerror(code)}")
    return fd


def userfaultfd_refused() -> str | None:
    """Why this process cannot use userfaultfd (None if it can)."""
    try:
        with FaultingMemory(PAGE, lambda page: b"\0" * PAGE):
            return None
    except OSError as exc:
        return f"userfaultfd is refused here: {exc}"


class FaultingMemory:
    """``size`` bytes of private anonymous memory (an ``mmap``) whose page
    ``n`` holds ``fill(n)`` (``PAGE`` bytes), written in when some thread
    first touches it and :meth:`resolve` runs (call it when
    :meth:`fileno` is readable: ``loop.add_reader``, ``select``)."""

    def __init__(self, size: int, fill: Callable[[int], bytes]) -> None:
        self.size = size
        self.filled = 0  # pages filled by resolve()
        self._fill = fill
        self._fd = _userfaultfd()
        try:
            api = bytearray(struct.pack("QQQ", _UFFD_API, 0, 0))
            fcntl.ioctl(self._fd, _UFFDIO_API, api)
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            anchor = ctypes.c_char.from_buffer(self.map)
            self._address = ctypes.addressof(anchor)
            del anchor  # (an export: it would keep the map from closing)
            register = bytearray(struct.pack("QQQQ", self._address, size, _MODE_MISSING, 0))
            fcntl.ioctl(self._fd, _UFFDIO_REGISTER, register)
        except BaseException:
            os.close(self._fd)
            raise
        self._page = ctypes.create_string_buffer(PAGE)

    def fileno(self) -> int:
        return self._fd

    def resolve(self) -> None:
        """Fill every page whose fault is pending."""
        while True:
            try:
                message = os.read(self._fd, _MSG_SIZE)
            except BlockingIOError:
                return
            if message[0] != _EVENT_PAGEFAULT:
                continue
            (address,) = struct.unpack_from("Q", message, 16)
            start = (address - self._address) // PAGE * PAGE
            content = self._fill(start // PAGE)
            ctypes.memmove(self._page, content, PAGE)
            copy = struct.pack(
                "QQQQq", self._address + start, ctypes.addressof(self._page), PAGE, 0, 0
            )
            try:
                fcntl.ioctl(self._fd, _UFFDIO_COPY, bytearray(copy))
            except FileExistsError:
                continue  # two threads touched it: filled already
            self.filled += 1

    def close(self) -> None:
        os.close(self._fd)
        self.map.close()

    def __enter__(self) -> FaultingMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
