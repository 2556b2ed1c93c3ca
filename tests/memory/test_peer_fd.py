"""Files from the front-end are mapped only when they cannot vanish under the back-end."""

from __future__ import annotations

import fcntl
import os

import pytest

from pyvhost_user.memory import BadMemoryRegion, PeerFdError, SealPolicy, map_peer_fd, map_region
from pyvhost_user.memory.dirty_log import DirtyLog, DirtyLogError
from pyvhost_user.virtqueue.errors import InvalidQueueConfig
from pyvhost_user.virtqueue.inflight import InflightRegion, queue_region_size


@pytest.fixture
def fds():
    opened: list[int] = []

    def memfd(size: int, flags: int = os.MFD_ALLOW_SEALING) -> int:
        fd = os.memfd_create("peer", os.MFD_CLOEXEC | flags)
        os.ftruncate(fd, size)
        opened.append(fd)
        return fd

    yield memfd
    for fd in opened:
        os.close(fd)


def test_a_sealable_file_is_sealed_against_shrinking_only(fds):
    fd = fds(1 << 16)
    peer = map_peer_fd(fd, 0, 1 << 16, "test")
    assert peer.shrink_sealed
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and not seals & (fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    os.ftruncate(fd, 1 << 17)  # growing stays allowed: nothing mapped can go away
    peer.view[0] = 0x5A
    assert os.pread(fd, 1, 0) == b"\x5a"


def test_an_unsealable_file_is_mapped_under_try_and_refused_under_require(fds):
    fd = fds(1 << 16, flags=0)
    assert not map_peer_fd(fd, 0, 1 << 16, "test", SealPolicy.TRY).shrink_sealed
    with pytest.raises(PeerFdError, match="cannot be sealed against shrinking"):
        map_peer_fd(fd, 0, 1 << 16, "test", SealPolicy.REQUIRE)


@pytest.mark.parametrize("offset, length", [(0, (1 << 16) + 1), (1 << 16, 1), (4096, 1 << 16)])
def test_a_range_past_the_end_of_the_file_is_refused(fds, offset, length):
    with pytest.raises(PeerFdError, match="needs 0x"):
        map_peer_fd(fds(1 << 16), offset, length, "test")


def test_an_empty_file_is_refused_for_every_kind_of_mapping(fds):
    """mmap does not check the size: an empty memfd used to map, then SIGBUS on first touch."""
    fd = fds(0)
    with pytest.raises(BadMemoryRegion):
        map_region(fd, 0, 4096, 0x7F00_0000_0000, 0)
    with pytest.raises(DirtyLogError):
        DirtyLog(fd, 4096, 0)
    with pytest.raises(InvalidQueueConfig):
        InflightRegion(fd, queue_region_size(128), 0, 1, 128)


def test_what_is_not_a_file_is_refused():
    r, w = os.pipe()
    try:
        with pytest.raises(PeerFdError, match="not a file that can be mapped"):
            map_peer_fd(r, 0, 4096, "test")
    finally:
        os.close(r)
        os.close(w)


def test_the_inflight_buffer_the_back_end_allocates_is_sealable():
    region, fd = InflightRegion.allocate(1, 128)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        os.close(fd)
        del region
