"""Guest memory: mapping from fds, translation edges, crossing regions, refusals."""

from __future__ import annotations

import mmap
import os

import pytest

from pyvhost_user.memory import BadMemoryRegion, GuestMemory, UnmappedAddress, map_region

MiB = 1 << 20
UVA_BASE = 0x7F00_0000_0000


@pytest.fixture
def memfd():
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 8 * MiB)
    yield fd
    os.close(fd)


@pytest.fixture
def two_regions(memfd):
    """gpa 0-4 MiB and gpa 4-8 MiB, adjacent in gpa, far apart in uva, one memfd."""
    mem = GuestMemory()
    mem.add(map_region(memfd, 0, 4 * MiB, UVA_BASE, 0))
    mem.add(map_region(memfd, 4 * MiB, 4 * MiB, UVA_BASE + 64 * MiB, 4 * MiB))
    return mem


def test_views_are_zero_copy_into_the_fd(memfd, two_regions):
    view = two_regions.view("gpa", 4096, 8)
    view[:] = b"ABCDEFGH"
    assert os.pread(memfd, 8, 4096) == b"ABCDEFGH"
    os.pwrite(memfd, b"xy", 4 * MiB + 10)
    assert bytes(two_regions.view("uva", UVA_BASE + 64 * MiB + 10, 2)) == b"xy"


def test_range_crossing_regions_is_split_in_order(memfd, two_regions):
    os.pwrite(memfd, b"0123456789", 4 * MiB - 5)
    parts = two_regions.views("gpa", 4 * MiB - 5, 10)
    assert [len(p) for p in parts] == [5, 5]
    assert b"".join(bytes(p) for p in parts) == b"0123456789"
    with pytest.raises(UnmappedAddress):
        two_regions.view("gpa", 4 * MiB - 5, 10)  # rings must be contiguous


@pytest.mark.parametrize(
    ("kind", "addr", "length"),
    [
        ("gpa", 8 * MiB, 1),  # just past the end
        ("gpa", 8 * MiB - 1, 2),  # straddles the end
        ("uva", UVA_BASE + 4 * MiB, 1),  # the hole between uva ranges
        ("uva", UVA_BASE - 1, 1),  # below every region
        ("gpa", 2**64 - 1, 2),  # wraps past 2**64
    ],
)
def test_unmapped_ranges_are_refused(two_regions, kind, addr, length):
    with pytest.raises(UnmappedAddress):
        two_regions.views(kind, addr, length)


def test_last_byte_of_memory_is_reachable(two_regions):
    assert len(two_regions.view("gpa", 8 * MiB - 1, 1)) == 1


def test_overlapping_regions_are_refused(memfd, two_regions):
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        two_regions.add(map_region(memfd, 6 * MiB, MiB, UVA_BASE + 512 * MiB, 0))
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        two_regions.add(map_region(memfd, 64 * MiB, MiB, UVA_BASE + MiB, 0))


def test_region_larger_than_its_fd_is_refused(memfd):
    with pytest.raises(BadMemoryRegion, match="needs"):
        map_region(memfd, 0, 16 * MiB, UVA_BASE, 0)


def test_non_mappable_fd_is_refused():
    r, w = os.pipe()
    try:
        with pytest.raises(BadMemoryRegion):
            map_region(r, 0, MiB, UVA_BASE, 0)
    finally:
        os.close(r)
        os.close(w)


def test_unaligned_mmap_offset_is_mapped_at_the_right_byte(memfd):
    os.pwrite(memfd, b"Z", mmap.PAGESIZE + 100)
    region = map_region(memfd, 0, MiB, UVA_BASE, mmap.PAGESIZE + 100)
    assert bytes(region.slice(0, 1)) == b"Z"


def test_remove_needs_exact_addresses_and_keeps_views_alive(memfd, two_regions):
    view = two_regions.view("gpa", 4 * MiB, 4)
    with pytest.raises(BadMemoryRegion):
        two_regions.remove(4 * MiB, 4 * MiB, UVA_BASE)  # wrong uva
    two_regions.remove(4 * MiB, 4 * MiB, UVA_BASE + 64 * MiB)
    with pytest.raises(UnmappedAddress):
        two_regions.view("gpa", 4 * MiB, 4)
    view[:] = b"live"  # a worker's view outlives the removal: no use-after-unmap
    assert os.pread(memfd, 4, 4 * MiB) == b"live"


def test_uva_to_gpa(two_regions):
    assert two_regions.uva_to_gpa(UVA_BASE + 64 * MiB + 3) == 4 * MiB + 3
    with pytest.raises(UnmappedAddress):
        two_regions.uva_to_gpa(UVA_BASE + 32 * MiB)


def test_table_is_bounded(memfd):
    mem = GuestMemory(max_regions=2)
    mem.add(map_region(memfd, 0, MiB, UVA_BASE, 0))
    mem.add(map_region(memfd, MiB, MiB, UVA_BASE + MiB, MiB))
    with pytest.raises(BadMemoryRegion, match="full"):
        mem.add(map_region(memfd, 2 * MiB, MiB, UVA_BASE + 2 * MiB, 2 * MiB))
