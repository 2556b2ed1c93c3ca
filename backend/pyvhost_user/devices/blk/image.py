"""The backing store of a virtio-blk device: a raw image file or a block device.

Data moves with ``preadv``/``pwritev`` straight between the image and the
views of guest memory the request carries: no intermediate buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from typing import Final

from ...memory.guest_memory import views_after
from ..base import DeviceError

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
BLKDISCARD: Final = 0x1277
BLKZEROOUT: Final = 0x127F
BLKGETSIZE64: Final = 0x80081272

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_ZEROS = bytes(1 << 20)


class ImageError(DeviceError):
    """The image cannot be opened or used."""


class Image:
    """An open raw image; all offsets and lengths in bytes."""

    def __init__(self, path: str, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise ImageError(f"cannot open image {path!r}: {exc.strerror}") from None
        mode = os.fstat(self.fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        if self.is_block_device:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8))
            self.size_bytes = struct.unpack("<Q", buf)[0]
        elif stat.S_ISREG(mode):
            self.size_bytes = os.fstat(self.fd).st_size
        else:
            os.close(self.fd)
            raise ImageError(f"image {path!r} is neither a regular file nor a block device")

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from the image at ``offset`` (short reads retried)."""
        while views:
            done = os.preadv(self.fd, views, offset)
            if done == 0:
                raise OSError(errno.EIO, f"image ends before offset {offset}")
            views = views_after(views, done)
            offset += done

    def write_from(self, views: list[memoryview], offset: int) -> None:
        while views:
            done = os.pwritev(self.fd, views, offset)
            views = views_after(views, done)
            offset += done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """A hint: the range may read back as anything afterwards."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
        else:
            self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """The range reads back as zeros afterwards."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
            return
        mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
        try:
            self._fallocate(mode | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length:
            chunk = min(length, len(_ZEROS))
            self.write_from([memoryview(_ZEROS)[:chunk]], offset)
            offset += chunk
            length -= chunk

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

