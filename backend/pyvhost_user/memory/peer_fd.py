"""Mapping a file the front-end sent, so that it cannot pull pages out from under us.

A shared mapping outlives the size of its file: if the file shrinks after we
mapped it (the front-end calls ftruncate), touching a page past the new end
raises SIGBUS, and a SIGBUS kills a Python process outright (no handler can
resume the faulting access). The same happens for a file that was too short
from the start, since mmap does not check the size. So, for every fd the
front-end hands us to map (guest memory, the dirty log, the inflight buffer):

* the file is sealed against shrinking (``F_SEAL_SHRINK``) when the kernel
  lets us: a memfd created with ``MFD_ALLOW_SEALING`` whose seals are not
  sealed yet. QEMU's ``memory-backend-memfd`` (``seal=on``, its default) seals
  GROW, SHRINK and SEAL itself, so its memfds arrive safe already;
* then (once it can no longer shrink) it must be at least offset + length long.

Files in tmpfs or hugetlbfs (``memory-backend-file``) and memfds made without
``MFD_ALLOW_SEALING`` cannot be sealed by anyone: ``SealPolicy.TRY`` maps them
with a warning naming the risk, ``SealPolicy.REQUIRE`` refuses them. Files that
are not regular (a DAX character device) have no size to lose.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import mmap
import os
import stat
from dataclasses import dataclass

from .errors import GuestMemoryError

log = logging.getLogger(__name__)


class SealPolicy(enum.Enum):
    TRY = "try"  # seal what can be sealed, map the rest with a warning
    REQUIRE = "require"  # refuse a regular file that cannot be sealed against shrinking


class PeerFdError(GuestMemoryError):
    """An fd from the front-end that cannot be mapped safely."""


@dataclass(eq=False)
class PeerMapping:
    mapping: mmap.mmap
    view: memoryview  # exactly [offset, offset + length) of the file
    shrink_sealed: bool  # False: a regular file the front-end could still shrink


def seal_against_shrinking(fd: int) -> bool:
    """True when the file cannot shrink any more (sealed now, or already)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # not a file that supports seals (tmpfs/hugetlbfs file, pipe ...)
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False  # F_SEAL_SEAL set, or a memfd made without MFD_ALLOW_SEALING
    return True


def map_peer_fd(fd: int, offset: int, length: int, what: str,
                policy: SealPolicy = SealPolicy.TRY) -> PeerMapping:
    """Map ``length`` bytes of ``fd`` at ``offset``, shared and writable.

    Raises ``PeerFdError`` (with ``what`` in the message) when that cannot be
    done safely. The caller keeps ownership of ``fd``.
    """
    if length <= 0:
        raise PeerFdError(f"{what}: length {length}")
    if offset < 0 or offset + length > 1 << 63:
        raise PeerFdError(f"{what}: offset {offset:#x} + length {length:#x} is out of range")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise PeerFdError(f"{what}: fd {fd} cannot be inspected: {exc.strerror}") from None
    sealed = True
    if stat.S_ISREG(mode):
        sealed = seal_against_shrinking(fd)
        if not sealed and policy is SealPolicy.REQUIRE:
            raise PeerFdError(
                f"{what}: the file cannot be sealed against shrinking (not a memfd made with "
                f"MFD_ALLOW_SEALING) and --memory-seal require is set"
            )
        size = os.fstat(fd).st_size  # after sealing: it can no longer go down
        if offset + length > size:
            raise PeerFdError(
                f"{what}: needs {offset + length:#x} bytes of its file, which has {size:#x}"
            )
        if not sealed:
            log.warning(
                "%s: the file cannot be sealed against shrinking; a front-end that truncates "
                "it would kill this back-end with SIGBUS (use a sealed memfd, or "
                "--memory-seal require to refuse such files)", what,
            )
    elif not stat.S_ISCHR(mode):
        raise PeerFdError(f"{what}: fd {fd} is not a file that can be mapped")
    aligned = offset - offset % mmap.PAGESIZE
    lead = offset - aligned
    try:
        mapping = mmap.mmap(fd, lead + length, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
    except (OSError, ValueError, OverflowError) as exc:
        raise PeerFdError(f"{what}: cannot map fd {fd}: {exc}") from None
    return PeerMapping(mapping, memoryview(mapping)[lead : lead + length], sealed)
