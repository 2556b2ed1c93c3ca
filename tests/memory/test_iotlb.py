"""One ASID's IOTLB: the kernel's rules, default states and reset_map."""

from __future__ import annotations

import os

import pytest

from pyvhost_user.memory import GuestMemory, map_region
from pyvhost_user.memory.iotlb import (
    PERM_READ,
    PERM_WRITE,
    DefaultMapping,
    Iotlb,
    IotlbAccessDenied,
    IotlbError,
    IotlbMiss,
    IotlbSpace,
)

MiB = 1 << 20
UVA = 0x7F00_0000_0000
RW = PERM_READ | PERM_WRITE


@pytest.fixture
def memory():
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 8 * MiB)
    mem = GuestMemory()
    mem.add(map_region(fd, 0, 8 * MiB, UVA, 0))
    os.close(fd)
    return mem


@pytest.fixture
def empty(memory):
    return Iotlb(1, memory, DefaultMapping.EMPTY)


def test_identity_default_translates_guest_physical_addresses(memory):
    iotlb = Iotlb(0, memory, DefaultMapping.IDENTITY)
    memory.view("gpa", 4096, 4)[:] = b"gpa!"
    assert bytes(iotlb.translate(4096, 4, RW)[0]) == b"gpa!"
    assert iotlb.is_default


def test_empty_default_misses(empty):
    with pytest.raises(IotlbMiss) as info:
        empty.translate(0x1000, 8, PERM_READ)
    assert info.value.iova == 0x1000 and info.value.asid == 1


def test_update_then_translate_across_two_entries(memory, empty):
    empty.update_refusing_overlap(0x10000, 0x1000, UVA + 0x5000, RW)
    empty.update_refusing_overlap(0x11000, 0x1000, UVA + 0x2000, RW)
    memory.view("uva", UVA + 0x5FFC, 4)[:] = b"AAAA"
    memory.view("uva", UVA + 0x2000, 4)[:] = b"BBBB"
    parts = empty.translate(0x10FFC, 8, PERM_READ)
    assert b"".join(bytes(p) for p in parts) == b"AAAABBBB"
    assert empty.mapped_bytes == 0x2000


def test_overlapping_update_is_refused(empty):
    empty.update_refusing_overlap(0x10000, 0x2000, UVA, RW)
    for iova, size in ((0x11000, 0x2000), (0xF000, 0x1001), (0x10800, 0x10)):
        with pytest.raises(IotlbError, match="overlaps"):
            empty.update_refusing_overlap(iova, size, UVA + 0x100000, RW)
    empty.update_refusing_overlap(0x12000, 0x1000, UVA, RW)  # adjacent is fine
    assert len(empty) == 2


def test_update_outside_memory_or_wrapping_is_refused(empty):
    with pytest.raises(IotlbError):
        empty.update_refusing_overlap(0, 0x1000, UVA + 8 * MiB, RW)
    with pytest.raises(IotlbError):
        empty.update_refusing_overlap(2**64 - 0x1000, 0x2000, UVA, RW)
    with pytest.raises(IotlbError):
        empty.update_refusing_overlap(0, 0, UVA, RW)


def test_invalidate_removes_overlapped_entries_whole(empty):
    empty.update_refusing_overlap(0x10000, 0x2000, UVA, RW)
    empty.update_refusing_overlap(0x20000, 0x1000, UVA, RW)
    empty.update_refusing_overlap(0x30000, 0x1000, UVA, RW)
    assert empty.invalidate_overlapping_whole(0x11FFF, 0xF002) == 2  # last byte of 1st, 1st of 2nd
    with pytest.raises(IotlbMiss):
        empty.translate(0x10000, 1, PERM_READ)  # not split: the whole entry went
    assert len(empty) == 1


def test_invalidate_all_leaves_empty_and_reset_map_restores_identity(memory):
    iotlb = Iotlb(0, memory, DefaultMapping.IDENTITY)
    iotlb.update_refusing_overlap(0x10000, 0x1000, UVA, RW)  # drops passthrough
    with pytest.raises(IotlbMiss):
        iotlb.translate(0x20000, 1, PERM_READ)
    iotlb.invalidate_overlapping_whole(0, 0)  # kernel: size 0 from 0 covers everything
    assert len(iotlb) == 0 and not iotlb.is_default  # empty is not the default
    with pytest.raises(IotlbMiss):
        iotlb.translate(0x10000, 1, PERM_READ)
    iotlb.reset_map()
    assert iotlb.is_default
    assert len(iotlb.translate(0x20000, 16, RW)) == 1


def test_invalidate_with_a_wrapping_end_does_nothing(empty):
    empty.update_refusing_overlap(0x10000, 0x1000, UVA, RW)
    assert empty.invalidate_overlapping_whole(0x10000, 0) == 0
    assert len(empty) == 1


@pytest.mark.parametrize(("granted", "needed"), [(PERM_READ, PERM_WRITE), (PERM_WRITE, PERM_READ)])
def test_permissions_are_enforced(empty, granted, needed):
    empty.update_refusing_overlap(0x10000, 0x1000, UVA, granted)
    with pytest.raises(IotlbAccessDenied):
        empty.translate(0x10000, 4, needed)
    assert empty.translate(0x10000, 4, granted)


def test_reset_map_is_independent_of_what_was_mapped(empty):
    for i in range(1000):
        empty.update_refusing_overlap(0x100000 + i * 0x1000, 0x1000, UVA, RW)
    empty.reset_map()
    assert len(empty) == 0 and empty.is_default and empty.mapped_bytes == 0


def test_iotlb_space_is_an_address_space(memory, empty):
    empty.update_refusing_overlap(0x10000, 0x1000, UVA, PERM_READ)
    space = IotlbSpace(empty)
    assert len(space.view(0x10000, 16, write=False)) == 16
    with pytest.raises(IotlbAccessDenied):
        space.view(0x10000, 16, write=True)
