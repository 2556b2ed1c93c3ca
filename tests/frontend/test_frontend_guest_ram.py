"""GuestRam alone: layout, accessors, allocator."""

from __future__ import annotations

import mmap
import os

import pytest

from pyvhost_user.frontend.guest_ram import MiB, GuestRam, GuestRamError


@pytest.fixture
def ram():
    with GuestRam() as guest_ram:
        yield guest_ram


def test_default_layout_has_adjacent_regions_and_a_hole(ram):
    first, second, third = ram.regions
    assert first.gpa_end == second.gpa  # adjacent: something to straddle
    assert third.gpa > second.gpa_end  # then a hole
    assert ram.boundaries() == [second.gpa]


def test_addresses_differ_so_gpa_uva_confusion_shows(ram):
    for region in ram.regions:
        assert region.user_addr != region.gpa
        assert region.mmap_offset != region.gpa
    first, second, _ = ram.regions
    # Adjacent in gpa, but neither in user address nor in the file.
    assert first.user_addr + first.size != second.user_addr
    assert first.mmap_offset + first.size != second.mmap_offset
    assert len({r.fd for r in ram.regions}) == 1  # one shared memfd by default


def test_write_is_visible_through_the_fd_at_mmap_offset(ram):
    region = ram.regions[1]
    ram.write(region.gpa + 100, b"hello")
    with mmap.mmap(region.fd, region.mmap_offset + region.size, mmap.MAP_SHARED) as backend_view:
        assert backend_view[region.mmap_offset + 100 : region.mmap_offset + 105] == b"hello"


def test_read_write_across_a_region_boundary(ram):
    boundary = ram.boundaries()[0]
    ram.write(boundary - 3, b"abcdef")
    assert ram.read(boundary - 3, 6) == b"abcdef"
    assert bytes(ram.view(boundary, 3)) == b"def"
    with pytest.raises(GuestRamError):
        ram.view(boundary - 3, 6)  # a single view cannot cross regions
    with pytest.raises(GuestRamError):
        ram.read(ram.regions[1].gpa_end - 1, 2)  # runs into the hole


def test_uva_translation(ram):
    region = ram.regions[2]
    assert ram.uva(region.gpa + 0x1234) == region.user_addr + 0x1234
    with pytest.raises(GuestRamError):
        ram.uva(ram.regions[1].gpa_end)  # in the hole


def test_alloc_aligns_and_never_straddles(ram):
    first = ram.regions[0]
    a = ram.alloc(3, 1)
    b = ram.alloc(100, 64)
    assert b % 64 == 0 and b >= a + 3
    big = ram.alloc(first.size - 64)  # does not fit in what is left of region 0
    assert ram.region_of(big, first.size - 64).index == 1


def test_straddling_allocation_and_free_coalesce(ram):
    gpa = ram.alloc_straddling(4096)
    boundary = ram.boundaries()[0]
    assert gpa < boundary < gpa + 4096
    with pytest.raises(GuestRamError):
        ram.alloc_at(boundary, 1)  # already taken
    ram.free(gpa)
    blocks = [ram.alloc(4096) for _ in range(10)]
    for block in blocks:
        ram.free(block)
    assert ram.allocated_bytes == 0
    # Everything coalesced again: the largest block fits.
    whole = ram.alloc_at(0, 32 * MiB)
    ram.free(whole)


def test_exhaustion_and_bad_free(ram):
    with pytest.raises(GuestRamError):
        ram.alloc(64 * MiB)
    with pytest.raises(GuestRamError):
        ram.free(12345)


def test_separate_fds_and_close():
    ram = GuestRam([(0, 1 * MiB), (2 * MiB, 1 * MiB)], separate_fds=True)
    fds = [r.fd for r in ram.regions]
    assert len(set(fds)) == 2
    ram.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_layout_is_validated():
    with pytest.raises(GuestRamError):
        GuestRam([(0, 2 * MiB), (1 * MiB, 2 * MiB)])
    with pytest.raises(GuestRamError):
        GuestRam([(100, 1 * MiB)])
