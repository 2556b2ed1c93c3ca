"""The dirty log of live migration: one bit per 4 KiB guest page the device wrote.

The front-end (QEMU) shares it with SET_LOG_BASE and reads-and-clears it while
migrating; the back-end sets the bit of every guest physical page it writes,
data buffers and used ring alike, before the used index moves. Setting a bit
is a read-modify-write of one byte; QEMU clears whole words atomically, so a
race can only leave a page marked twice, never lose a mark.
"""

from __future__ import annotations

import ctypes
import threading

from .errors import GuestMemoryError
from .peer_fd import PeerFdError, SealPolicy, map_peer_fd

LOG_PAGE = 0x1000


class DirtyLogError(GuestMemoryError):
    """The log fd cannot be mapped."""


class DirtyLog:
    def __init__(self, fd: int, size: int, offset: int,
                 seal: SealPolicy = SealPolicy.TRY) -> None:
        if size == 0:
            raise DirtyLogError("dirty log of size 0")
        try:
            peer = map_peer_fd(fd, offset, size, "dirty log", seal)
        except PeerFdError as exc:
            raise DirtyLogError(str(exc)) from None
        self._mapping = peer.mapping
        self.view = peer.view
        self.size = size
        self.pages_marked = 0
        self.marks_outside = 0  # writes past the log (a too-small log from the front-end)
        self._lock = threading.Lock()  # several queue workers mark the same bytes

    @property
    def covered_bytes(self) -> int:
        return self.size * 8 * LOG_PAGE

    def mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first, last = gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE
        with self._lock:
            for page in range(first, last + 1):
                index = page >> 3
                if index >= self.size:
                    self.marks_outside += 1
                    continue
                self.view[index] |= 1 << (page & 7)
                self.pages_marked += 1


def buffer_address(view: memoryview) -> int:
    """The process address of a writable view's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
