"""A device's address spaces: table-driven tests of every rule ``AddressSpaces`` keeps.

The rules (``vdpa-reset-map.md``; Linux drivers/vhost/vdpa.c and
drivers/vdpa/vdpa_sim/vdpa_sim.c): groups start on ASID 0 and a device reset
puts them back there without touching any IOTLB; ``reset_map(asid)`` puts one
ASID back in its default state, in O(1); invalidating everything leaves an
ASID empty, which is not its default when the default is identity; on
disconnect only the ASIDs the front-end changed are reset (``reset_touched``),
and an ASID just reset is no longer "touched".
"""

from __future__ import annotations

import os

import pytest

from pyvhost_user.memory import GuestMemory, UnmappedAddress, map_region
from pyvhost_user.memory.address_spaces import AddressSpaces
from pyvhost_user.memory.iotlb import (
    PERM_READ,
    PERM_WRITE,
    DefaultMapping,
    Iotlb,
    IotlbAccessDenied,
    IotlbError,
    IotlbMiss,
)

MiB = 1 << 20
UVA = 0x7F00_0000_0000
RW = PERM_READ | PERM_WRITE
ID = DefaultMapping.IDENTITY
EM = DefaultMapping.EMPTY

# Two regions with a hole between them in guest physical addresses.
GPA_B = 4 * MiB


@pytest.fixture
def memory():
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 4 * MiB)
    mem = GuestMemory()
    mem.add(map_region(fd, 0, 2 * MiB, UVA, 0))
    mem.add(map_region(fd, GPA_B, 2 * MiB, UVA + 2 * MiB, 2 * MiB))
    os.close(fd)
    return mem


def spaces(memory, defaults=(ID, EM, EM), groups=3) -> AddressSpaces:
    return AddressSpaces(memory, list(defaults), groups)


def snapshot(aspaces: AddressSpaces):
    return [(t.entries(), t.passthrough, t.mapped_bytes) for t in aspaces.iotlbs]


def map_some(iotlb: Iotlb, count: int = 3, base: int = 0x10000) -> None:
    for i in range(count):
        iotlb.update_refusing_overlap(base + i * 0x1000, 0x1000, UVA + i * 0x1000, RW)


# -- construction and binding ------------------------------------------------------
@pytest.mark.parametrize(
    ("defaults", "groups"),
    [
        pytest.param((ID,), 1, id="blk-one-asid-one-group"),
        pytest.param((ID, EM), 2, id="net-data-and-cvq"),
        pytest.param((EM, EM, EM, EM), 5, id="more-groups-than-asids"),
        pytest.param((ID, ID), 1, id="more-asids-than-groups"),
    ],
)
def test_groups_start_on_asid0(memory, defaults, groups):
    aspaces = spaces(memory, defaults, groups)
    assert aspaces.group_asid == [0] * groups
    assert all(aspaces.iotlb_of_group(g) is aspaces.iotlbs[0] for g in range(groups))
    assert [t.asid for t in aspaces.iotlbs] == list(range(len(defaults)))
    assert [t.default for t in aspaces.iotlbs] == list(defaults)
    assert all(t.is_default and not t.touched for t in aspaces.iotlbs)


@pytest.mark.parametrize(
    ("defaults", "groups"),
    [pytest.param((), 1, id="no-asid"), pytest.param((ID,), 0, id="no-group")],
)
def test_a_device_needs_an_asid_and_a_group(memory, defaults, groups):
    with pytest.raises(ValueError):
        AddressSpaces(memory, list(defaults), groups)


@pytest.mark.parametrize(
    ("group", "asid"),
    [
        pytest.param(3, 0, id="group-past-the-end"),
        pytest.param(-1, 0, id="negative-group"),
        pytest.param(0, 3, id="asid-past-the-end"),
        pytest.param(0, -1, id="negative-asid"),
        pytest.param(1, 99, id="far-asid"),
    ],
)
def test_bind_to_an_unknown_group_or_asid_is_refused(memory, group, asid):
    aspaces = spaces(memory)
    aspaces.bind_group(2, 1)
    with pytest.raises(IotlbError, match="does not exist"):
        aspaces.bind_group(group, asid)
    assert aspaces.group_asid == [0, 0, 1]  # unchanged


@pytest.mark.parametrize("asid", [pytest.param(a, id=f"asid{a}") for a in (-1, 3, 1 << 32)])
def test_an_unknown_asid_is_refused_everywhere(memory, asid):
    aspaces = spaces(memory)
    with pytest.raises(IotlbError):
        aspaces.iotlb(asid)
    with pytest.raises(IotlbError):
        aspaces.reset_map(asid)


@pytest.mark.parametrize(
    "binds",
    [
        pytest.param([], id="nothing-bound"),
        pytest.param([(2, 1)], id="cvq-on-asid1"),
        pytest.param([(0, 2), (1, 1), (2, 2)], id="every-group-moved"),
        pytest.param([(1, 2), (1, 0)], id="moved-and-back"),
    ],
)
def test_bind_moves_only_that_group(memory, binds):
    aspaces = spaces(memory)
    expected = [0, 0, 0]
    for group, asid in binds:
        aspaces.bind_group(group, asid)
        expected[group] = asid
        assert aspaces.group_asid == expected
    for group, asid in enumerate(expected):
        assert aspaces.iotlb_of_group(group) is aspaces.iotlbs[asid]


# -- device reset vs reset_map --------------------------------------------------------
@pytest.mark.parametrize(
    ("binds", "mapped"),
    [
        pytest.param([(2, 1)], (0, 1), id="cvq-on-asid1-both-mapped"),
        pytest.param([(0, 2), (1, 2), (2, 1)], (0, 1, 2), id="all-moved-all-mapped"),
        pytest.param([(1, 1)], (), id="nothing-mapped"),
        pytest.param([], (2,), id="no-bind-only-asid2-mapped"),
    ],
)
def test_device_reset_rebinds_every_group_and_keeps_every_iotlb(memory, binds, mapped):
    aspaces = spaces(memory)
    for group, asid in binds:
        aspaces.bind_group(group, asid)
    for asid in mapped:
        map_some(aspaces.iotlbs[asid], count=asid + 2)
    before = snapshot(aspaces)
    generations = [t.generation for t in aspaces.iotlbs]
    touched = [t.touched for t in aspaces.iotlbs]

    aspaces.rebind_all_to_asid0()

    assert aspaces.group_asid == [0, 0, 0]
    assert snapshot(aspaces) == before
    assert [t.generation for t in aspaces.iotlbs] == generations
    assert [t.touched for t in aspaces.iotlbs] == touched


@pytest.mark.parametrize("target", [pytest.param(a, id=f"reset-asid{a}") for a in range(3)])
def test_reset_map_only_touches_that_asid(memory, target):
    aspaces = spaces(memory)
    aspaces.bind_group(1, 1)
    aspaces.bind_group(2, 2)
    for asid in range(3):
        map_some(aspaces.iotlbs[asid], count=asid + 1)
    before = snapshot(aspaces)
    generations = [t.generation for t in aspaces.iotlbs]

    aspaces.reset_map(target)

    after = snapshot(aspaces)
    for asid in range(3):
        if asid == target:
            assert aspaces.iotlbs[asid].is_default
            assert aspaces.iotlbs[asid].generation > generations[asid]  # waiters woken
        else:
            assert after[asid] == before[asid]
            assert aspaces.iotlbs[asid].generation == generations[asid]
    assert aspaces.group_asid == [0, 1, 2]  # reset_map is not a device reset


# -- empty is not default ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("default", "mapped_first", "iova", "size", "is_default_after"),
    [
        pytest.param(ID, True, 0, 0, False, id="identity-mapped-invalidate-0+0"),
        pytest.param(ID, False, 0, 0, False, id="identity-passthrough-invalidate-0+0"),
        pytest.param(ID, True, 0x10000, 0x3000, False, id="identity-invalidate-exact-span"),
        pytest.param(ID, False, 0x1000, 1, False, id="identity-invalidate-one-byte"),
        pytest.param(EM, True, 0, 0, True, id="empty-mapped-invalidate-0+0"),
        pytest.param(EM, False, 0, 0, True, id="empty-unmapped-invalidate-0+0"),
    ],
)
def test_invalidating_everything_leaves_the_asid_empty_not_default(
    memory, default, mapped_first, iova, size, is_default_after
):
    aspaces = spaces(memory, (default,), 1)
    iotlb = aspaces.iotlb(0)
    if mapped_first:
        map_some(iotlb)
    iotlb.invalidate_overlapping_whole(iova, size)
    assert len(iotlb) == 0 and iotlb.mapped_bytes == 0
    assert not iotlb.passthrough
    assert iotlb.describe()["state"] == "empty"
    assert iotlb.is_default is is_default_after
    with pytest.raises(IotlbMiss):  # empty: every access misses, gpa 0 included
        iotlb.translate(0, 1, PERM_READ)
    aspaces.reset_map(0)
    assert iotlb.is_default
    assert iotlb.passthrough is (default is ID)


# -- reset_touched and "touched" -----------------------------------------------------------
def _apply(iotlb: Iotlb, action: str) -> None:
    if action == "update":
        iotlb.update_refusing_overlap(0x10000, 0x1000, UVA, RW)
    elif action == "invalidate":
        iotlb.invalidate_overlapping_whole(0x10000, 0x1000)
    elif action == "invalidate-wrapping":
        iotlb.invalidate_overlapping_whole(0x10000, 0)  # kernel: last < iova, nothing
    elif action == "refused-update":
        with pytest.raises(IotlbError):
            iotlb.update_refusing_overlap(0x10000, 0, UVA, RW)
    elif action == "translate":
        try:
            iotlb.translate(0x10000, 1, PERM_READ)
        except UnmappedAddress:
            pass
    elif action == "update-then-reset-map":
        iotlb.update_refusing_overlap(0x10000, 0x1000, UVA, RW)
        iotlb.reset_map()
    elif action == "reset-map":
        iotlb.reset_map()
    else:  # "nothing"
        assert action == "nothing"


# (actions per ASID 0..2, ASIDs reset_touched must return). ASIDs 0 is IDENTITY, 1-2 EMPTY.
TOUCHED_CASES = [
    pytest.param(("nothing",) * 3, [], id="nothing-changed"),
    pytest.param(("update", "nothing", "nothing"), [0], id="update-asid0"),
    pytest.param(("nothing", "update", "update"), [1, 2], id="update-asid1-asid2"),
    pytest.param(("invalidate", "nothing", "nothing"), [0], id="invalidate-drops-passthrough"),
    # Documented: any in-range INVALIDATE counts as a change, even one that removes
    # nothing from an EMPTY ASID (harmless: resetting it is a no-op).
    pytest.param(("nothing", "invalidate", "nothing"), [1], id="invalidate-on-empty-asid"),
    pytest.param(("invalidate-wrapping",) * 3, [], id="wrapping-invalidate-changes-nothing"),
    pytest.param(("refused-update",) * 3, [], id="refused-update-changes-nothing"),
    pytest.param(("translate",) * 3, [], id="translate-changes-nothing"),
    # A reset_map puts the ASID back as it was at connect: no longer touched.
    pytest.param(("update-then-reset-map", "update", "nothing"), [1], id="update-then-reset-map"),
    pytest.param(("reset-map",) * 3, [], id="reset-map-of-a-pristine-asid"),
]


@pytest.mark.parametrize(("actions", "expected"), TOUCHED_CASES)
def test_reset_touched_resets_exactly_the_changed_asids(memory, actions, expected):
    aspaces = spaces(memory)
    for iotlb, action in zip(aspaces.iotlbs, actions):
        _apply(iotlb, action)
    before = snapshot(aspaces)

    assert aspaces.reset_touched() == expected

    after = snapshot(aspaces)
    for asid, iotlb in enumerate(aspaces.iotlbs):
        if asid in expected:
            assert iotlb.is_default
        else:
            assert after[asid] == before[asid]


@pytest.mark.parametrize(("actions", "expected"), TOUCHED_CASES)
def test_after_reset_touched_no_asid_is_touched(memory, actions, expected):
    aspaces = spaces(memory)
    for iotlb, action in zip(aspaces.iotlbs, actions):
        _apply(iotlb, action)
    aspaces.reset_touched()
    assert [t.asid for t in aspaces.iotlbs if t.touched] == []
    assert aspaces.reset_touched() == []  # a second disconnect has nothing to reset


@pytest.mark.parametrize(
    "default", [pytest.param(ID, id="identity"), pytest.param(EM, id="empty")]
)
@pytest.mark.parametrize("mapped", [pytest.param(False, id="pristine"), pytest.param(True, id="mapped")])
def test_reset_map_clears_touched(memory, default, mapped):
    iotlb = spaces(memory, (default,), 1).iotlb(0)
    if mapped:
        map_some(iotlb)
        assert iotlb.touched
    iotlb.reset_map()
    assert not iotlb.touched


# -- default mappings ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gpa", "length", "uva_of_first_byte", "pieces"),
    [
        pytest.param(0, 16, UVA, 1, id="start-of-region-a"),
        pytest.param(2 * MiB - 8, 8, UVA + 2 * MiB - 8, 1, id="end-of-region-a"),
        pytest.param(GPA_B, 16, UVA + 2 * MiB, 1, id="start-of-region-b"),
        pytest.param(GPA_B + 2 * MiB - 1, 1, UVA + 4 * MiB - 1, 1, id="last-byte-of-b"),
    ],
)
def test_identity_default_translates_gpa_one_to_one_over_the_memory_table(
    memory, gpa, length, uva_of_first_byte, pieces
):
    iotlb = spaces(memory, (ID, EM), 1).iotlb(0)
    marker = os.urandom(length)
    memory.view("uva", uva_of_first_byte, length)[:] = marker
    views = iotlb.translate(gpa, length, RW)
    assert len(views) == pieces
    assert b"".join(bytes(v) for v in views) == marker
    assert iotlb.describe()["mapped_bytes"] == memory.total_bytes()


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        pytest.param(2 * MiB, 1, id="in-the-hole"),
        pytest.param(2 * MiB - 1, 2, id="runs-into-the-hole"),
        pytest.param(6 * MiB, 1, id="past-the-table"),
    ],
)
def test_identity_default_outside_the_memory_table_fails_without_a_miss(memory, gpa, length):
    """Documented behaviour: nothing to ask the front-end for, so not an ``IotlbMiss``."""
    iotlb = spaces(memory, (ID,), 1).iotlb(0)
    with pytest.raises(UnmappedAddress) as info:
        iotlb.translate(gpa, length, PERM_READ)
    assert not isinstance(info.value, (IotlbMiss, IotlbAccessDenied))


@pytest.mark.parametrize(
    ("gpa", "perm"),
    [
        pytest.param(0, PERM_READ, id="gpa0-read"),
        pytest.param(0x1000, PERM_WRITE, id="mapped-gpa-write"),
        pytest.param(GPA_B, RW, id="region-b-rw"),
        pytest.param(8 * MiB, PERM_READ, id="outside-memory"),
    ],
)
def test_empty_default_misses_everywhere(memory, gpa, perm):
    iotlb = spaces(memory, (ID, EM), 2).iotlb(1)
    with pytest.raises(IotlbMiss) as info:
        iotlb.translate(gpa, 4, perm)
    assert (info.value.asid, info.value.iova, info.value.perm) == (1, gpa, perm)
    assert iotlb.describe()["mapped_bytes"] == 0


@pytest.mark.parametrize(
    ("iova", "size", "uaddr", "perm"),
    [
        pytest.param(0x10000, 0x1000, UVA, RW, id="rw"),
        pytest.param(0x10000, 0x1000, UVA, PERM_READ, id="read-only"),
        pytest.param(0, 1, UVA + 4 * MiB - 1, PERM_WRITE, id="one-byte-at-gpa0"),
    ],
)
def test_first_update_on_identity_drops_the_passthrough(memory, iova, size, uaddr, perm):
    iotlb = spaces(memory, (ID,), 1).iotlb(0)
    iotlb.update_refusing_overlap(iova, size, uaddr, perm)
    assert not iotlb.passthrough and not iotlb.is_default and iotlb.touched
    assert iotlb.describe()["state"] == "mapped"
    assert iotlb.describe()["mapped_bytes"] == size
    with pytest.raises(IotlbMiss):  # reachable 1:1 before, not any more
        iotlb.translate(0x40000, 1, PERM_READ)
    memory.view("uva", uaddr, 1)[:] = b"\xa5"
    assert bytes(iotlb.translate(iova, 1, perm)[0]) == b"\xa5"  # through the entry now


@pytest.mark.parametrize(
    ("iova", "size", "uaddr", "perm"),
    [
        pytest.param(0x10000, 0, UVA, RW, id="size-0"),
        pytest.param(2**64 - 0x1000, 0x2000, UVA, RW, id="wraps"),
        pytest.param(0x10000, 0x1000, UVA, 0, id="no-permission"),
        pytest.param(0x10000, 0x1000, UVA + 4 * MiB, RW, id="target-outside-memory"),
        pytest.param(0x10000, 0x1000, UVA - 0x800, RW, id="target-starts-before-memory"),
    ],
)
def test_refused_update_on_identity_keeps_the_passthrough(memory, iova, size, uaddr, perm):
    iotlb = spaces(memory, (ID,), 1).iotlb(0)
    generation = iotlb.generation
    with pytest.raises(IotlbError):
        iotlb.update_refusing_overlap(iova, size, uaddr, perm)
    assert iotlb.passthrough and iotlb.is_default and not iotlb.touched
    assert iotlb.generation == generation
    assert len(iotlb.translate(0x40000, 16, RW)) == 1


# -- re-updates and overlaps: what the code does ------------------------------------------
# Existing entry: iova 0x10000-0x11FFF -> UVA+0x1000, RW. Every update sharing one byte
# with it is refused (kernel: -EEXIST), an identical re-send included: UPDATE is not
# idempotent, and the existing entry is left exactly as it was. Adjacent ranges are fine.
@pytest.mark.parametrize(
    ("iova", "size", "uaddr", "perm", "accepted"),
    [
        pytest.param(0x10000, 0x2000, UVA + 0x1000, RW, False, id="identical-re-update"),
        pytest.param(0x10000, 0x2000, UVA + 0x9000, PERM_READ, False, id="same-range-new-target"),
        pytest.param(0x10800, 0x100, UVA, RW, False, id="contained"),
        pytest.param(0xF000, 0x4000, UVA, RW, False, id="containing"),
        pytest.param(0xF000, 0x1001, UVA, RW, False, id="overlaps-first-byte"),
        pytest.param(0x11FFF, 0x10, UVA, RW, False, id="overlaps-last-byte"),
        pytest.param(0xF000, 0x1000, UVA, RW, True, id="adjacent-below"),
        pytest.param(0x12000, 0x1000, UVA, RW, True, id="adjacent-above"),
    ],
)
@pytest.mark.parametrize("default", [pytest.param(ID, id="identity"), pytest.param(EM, id="empty")])
def test_identical_or_overlapping_update_is_refused(
    memory, default, iova, size, uaddr, perm, accepted
):
    iotlb = spaces(memory, (default,), 1).iotlb(0)
    iotlb.update_refusing_overlap(0x10000, 0x2000, UVA + 0x1000, RW)
    before, generation = iotlb.entries(), iotlb.generation
    if accepted:
        iotlb.update_refusing_overlap(iova, size, uaddr, perm)
        assert len(iotlb) == 2 and iotlb.mapped_bytes == 0x2000 + size
    else:
        with pytest.raises(IotlbError, match="overlaps entry 0x10000-0x11fff"):
            iotlb.update_refusing_overlap(iova, size, uaddr, perm)
        assert iotlb.entries() == before and iotlb.generation == generation
        assert iotlb.mapped_bytes == 0x2000


# -- reset_map is O(1): it never walks the entries -------------------------------------------
class Tripwire:
    """Stands in for one of the IOTLB's containers and records every use of it.

    Works whatever the container is (list, sorted list ...): any attribute read
    or protocol call (len, iteration, indexing, deletion) is logged, then
    forwarded, so a reset_map that walks or empties its table shows up here.
    """

    def __init__(self, inner, log):
        object.__setattr__(self, "_tw", (inner, log))

    def __getattribute__(self, name):
        inner, log = object.__getattribute__(self, "_tw")
        log.append(name)
        return getattr(inner, name)


def _tripped(name):
    def method(self, *args):
        inner, log = object.__getattribute__(self, "_tw")
        log.append(name)
        return getattr(inner, name)(*args)

    return method


for _name in (
    "__len__", "__iter__", "__reversed__", "__contains__", "__getitem__", "__setitem__",
    "__delitem__", "__bool__", "__iadd__",
):
    setattr(Tripwire, _name, _tripped(_name))


def _containers(iotlb: Iotlb) -> list[str]:
    """The private, sized containers an Iotlb keeps its entries in."""
    return [
        name
        for name, value in vars(iotlb).items()
        if name.startswith("_")
        and hasattr(value, "__len__")
        and hasattr(value, "__iter__")
        and not isinstance(value, (str, bytes))
    ]


@pytest.mark.parametrize("count", [0, 1, 10, 1000])
@pytest.mark.parametrize("default", [pytest.param(ID, id="identity"), pytest.param(EM, id="empty")])
@pytest.mark.parametrize("via", ["iotlb", "address-spaces", "reset-touched"])
def test_reset_map_does_not_walk_the_entries(memory, default, count, via):
    aspaces = spaces(memory, (default,), 1)
    iotlb = aspaces.iotlb(0)
    map_some(iotlb, count=count, base=0x100000)
    if count == 0:
        iotlb.invalidate_overlapping_whole(0x10000, 1)  # touched, still nothing mapped
    names = _containers(iotlb)
    assert names, "found no container to watch"
    log: list[str] = []
    originals = {name: getattr(iotlb, name) for name in names}
    for name in names:
        setattr(iotlb, name, Tripwire(originals[name], log))
    wires = {name: getattr(iotlb, name) for name in names}

    if via == "iotlb":
        iotlb.reset_map()
    elif via == "address-spaces":
        aspaces.reset_map(0)
    else:
        assert aspaces.reset_touched() == [0]

    assert log == []  # the old containers were dropped, not emptied, read or measured
    for name in names:
        assert getattr(iotlb, name) is not wires[name]
        # Intact: a reader holding them is unaffected (the translation cache is
        # empty here: nothing was translated).
        assert len(originals[name]) == (0 if name == "_cache" else count)
    assert len(iotlb) == 0 and iotlb.mapped_bytes == 0 and iotlb.is_default
