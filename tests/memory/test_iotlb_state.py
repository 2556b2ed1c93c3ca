"""Address spaces as a portable value (memory/iotlb_state.py): capture, check, restore.

The rule under test: an IOTLB entry's target travels as a guest physical
address and resolves, on the destination, through the destination's own
memory table, whatever user addresses its front-end uses.
"""

from __future__ import annotations

import os

import pytest

from pyvhost_user.memory import GuestMemory, UnmappedAddress, map_region
from pyvhost_user.memory.address_spaces import AddressSpaces
from pyvhost_user.memory.iotlb import PERM_READ, PERM_WRITE, DefaultMapping, IotlbEntry
from pyvhost_user.memory.iotlb_state import (
    AddressSpacesState,
    IotlbState,
    IotlbStateError,
    capture,
    check_restorable,
    restore,
)

MiB = 1 << 20
RW = PERM_READ | PERM_WRITE
ID = DefaultMapping.IDENTITY
EM = DefaultMapping.EMPTY
SOURCE_UVA = 0x7F00_0000_0000
DEST_UVA = 0x5500_0000_0000  # the destination's front-end maps the same RAM elsewhere
GPA_B = 4 * MiB  # second region, after a hole


@pytest.fixture
def ram_fd():
    """The guest's RAM: one file both "front-ends" map (4 MiB, two 2 MiB regions)."""
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 4 * MiB)
    os.pwrite(fd, b"".join(i.to_bytes(4, "little") for i in range(MiB)), 0)
    yield fd
    os.close(fd)


def table(fd: int, uva: int, *, second_region: bool = True) -> GuestMemory:
    memory = GuestMemory()
    memory.add(map_region(fd, 0, 2 * MiB, uva, 0))
    if second_region:
        # Adjacent to the first in user space only: not in guest physical space.
        memory.add(map_region(fd, GPA_B, 2 * MiB, uva + 2 * MiB, 2 * MiB))
    return memory


def read_through(spaces: AddressSpaces, asid: int, iova: int, length: int) -> bytes:
    return b"".join(bytes(v) for v in spaces.iotlb(asid).translate(iova, length, PERM_READ))


def populated_source(fd: int) -> AddressSpaces:
    spaces = AddressSpaces(table(fd, SOURCE_UVA), [ID, EM, EM], 1)
    spaces.iotlb(1).update_refusing_overlap(0x10000, 0x2000, SOURCE_UVA + 0x3000, RW)
    spaces.iotlb(1).update_refusing_overlap(0x40000, 0x1000, SOURCE_UVA + 2 * MiB + 0x5000,
                                           PERM_READ)
    spaces.iotlb(2).update_refusing_overlap(0x9000, 0x1000, SOURCE_UVA + 0x8000, PERM_WRITE)
    spaces.bind_group(0, 1)
    return spaces


def test_capture_turns_user_addresses_into_guest_physical(ram_fd):
    state = capture(populated_source(ram_fd))
    assert state.group_asid == (1,)
    asid0, asid1, asid2 = state.iotlbs
    assert asid0 == IotlbState(0, ID, True, ())  # identity, untouched: still a flag
    assert asid0.at_default and not asid1.at_default
    assert asid1.entries == (
        IotlbEntry(0x10000, 0x2000, 0x3000, RW, "gpa"),
        IotlbEntry(0x40000, 0x1000, GPA_B + 0x5000, PERM_READ, "gpa"),
    )
    assert asid2.entries == (IotlbEntry(0x9000, 0x1000, 0x8000, PERM_WRITE, "gpa"),)


def test_restore_resolves_through_the_destination_table(ram_fd):
    source = populated_source(ram_fd)
    expected = [read_through(source, 1, 0x10000, 0x2000), read_through(source, 1, 0x40000, 0x1000)]
    destination = AddressSpaces(table(ram_fd, DEST_UVA), [ID, EM, EM], 1)
    state = capture(source)
    check_restorable(state, destination)
    restore(destination, state)
    assert destination.group_asid == [1]
    assert [read_through(destination, 1, 0x10000, 0x2000),
            read_through(destination, 1, 0x40000, 0x1000)] == expected
    assert destination.iotlb(0).passthrough and destination.iotlb(0).is_default
    assert destination.iotlb(1).touched and not destination.iotlb(0).touched
    # The restored state captures again to the same value (a second migration).
    assert capture(destination) == state


def test_restore_before_any_memory_table_resolves_once_it_arrives(ram_fd):
    state = capture(populated_source(ram_fd))
    memory = GuestMemory()
    destination = AddressSpaces(memory, [ID, EM, EM], 1)
    check_restorable(state, destination)  # nothing to check the entries against yet
    restore(destination, state)
    with pytest.raises(UnmappedAddress):
        read_through(destination, 1, 0x10000, 0x10)
    for region in table(ram_fd, DEST_UVA).regions:
        memory.add(region)
    assert read_through(destination, 1, 0x10000, 4) == (0x3000 // 4).to_bytes(4, "little")


def test_entries_outside_the_destination_table_are_refused(ram_fd):
    state = capture(populated_source(ram_fd))
    destination = AddressSpaces(table(ram_fd, DEST_UVA, second_region=False), [ID, EM, EM], 1)
    with pytest.raises(IotlbStateError, match="asid 1 entry iova 0x40000.*outside"):
        check_restorable(state, destination)


@pytest.mark.parametrize(
    ("defaults", "groups", "match"),
    [
        pytest.param([ID, EM], 1, "3 address spaces, this back-end 2", id="asid-count"),
        pytest.param([ID, EM, EM], 2, "1 virtqueue groups, this device 2", id="group-count"),
        pytest.param([EM, EM, EM], 1, "asid 0: default identity on the source, empty here",
                     id="default"),
    ],
)
def test_a_destination_configured_otherwise_is_refused(ram_fd, defaults, groups, match):
    state = capture(populated_source(ram_fd))
    destination = AddressSpaces(table(ram_fd, DEST_UVA), defaults, groups)
    with pytest.raises(IotlbStateError, match=match):
        check_restorable(state, destination)


def test_an_entry_that_is_not_one_guest_physical_range_cannot_be_captured(ram_fd):
    spaces = AddressSpaces(table(ram_fd, SOURCE_UVA), [EM], 1)
    # The two regions touch in user space, not in guest physical space.
    spaces.iotlb(0).update_refusing_overlap(0, 0x2000, SOURCE_UVA + 2 * MiB - 0x1000, RW)
    with pytest.raises(IotlbStateError, match="not one guest physical range"):
        capture(spaces)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: IotlbState(0, EM, True, (IotlbEntry(0, 1, 0, RW, "gpa"),)),
                     "passthrough with 1 entries", id="passthrough-with-entries"),
        pytest.param(lambda: IotlbState(0, EM, False, (IotlbEntry(0, 1, 0, RW, "uva"),)),
                     "not a gpa", id="user-address-target"),
        pytest.param(lambda: IotlbState(0, EM, False, (IotlbEntry(0, 0, 0, RW, "gpa"),)),
                     "empty", id="empty-entry"),
        pytest.param(lambda: IotlbState(0, EM, False, (IotlbEntry(1 << 63, 1 << 63, 0, RW, "gpa"),
                                                       IotlbEntry(0, 1, 0, RW, "gpa"))),
                     "unsorted", id="unsorted"),
        pytest.param(lambda: IotlbState(0, EM, False, (IotlbEntry(0, 0x2000, 0, RW, "gpa"),
                                                       IotlbEntry(0x1000, 1, 0, RW, "gpa"))),
                     "overlapping", id="overlapping"),
        pytest.param(lambda: IotlbState(0, EM, False, (IotlbEntry(0, 1, 0, 0, "gpa"),)),
                     "permission 0", id="no-permission"),
        pytest.param(lambda: IotlbState(0, EM, False,
                                        (IotlbEntry(0, 2, (1 << 64) - 1, RW, "gpa"),)),
                     "wraps", id="target-wraps"),
        pytest.param(lambda: AddressSpacesState((0,), (IotlbState(1, EM, False),)),
                     "not 0..0", id="asid-numbering"),
        pytest.param(lambda: AddressSpacesState((1,), (IotlbState(0, EM, False),)),
                     "group 0 bound to ASID 1", id="binding-to-missing-asid"),
        pytest.param(lambda: AddressSpacesState((), (IotlbState(0, EM, False),)),
                     "no virtqueue group", id="no-group"),
    ],
)
def test_malformed_states_cannot_be_built(build, match):
    with pytest.raises(IotlbStateError, match=match):
        build()
