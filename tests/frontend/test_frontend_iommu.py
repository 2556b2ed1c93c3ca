"""The front-end's guest IOMMU model: page tables, IOVA runs, coalesced entries."""

from __future__ import annotations

import pytest

from pyvhost_user.frontend import GuestRam, Iommu, IommuFault, SplitRing
from pyvhost_user.frontend.guest_ram import MiB, PAGE_SIZE
from pyvhost_user.frontend.iommu import IOVA_OFFSET
from pyvhost_user.wire import IotlbPerm

pytestmark = pytest.mark.timeout(30)
LAYOUT = ((0, 1 * MiB), (1 * MiB, 1 * MiB), (4 << 30, 1 * MiB))


@pytest.fixture
def ram():
    with GuestRam(LAYOUT) as ram:
        yield ram


def test_offset_mode_is_one_entry_per_region(ram):
    iommu = Iommu(ram)
    assert iommu.iova(0x1234) == IOVA_OFFSET + 0x1234
    assert iommu.translate(IOVA_OFFSET + 0x1234) == 0x1234
    entries = list(iommu.entries())
    assert [(e.iova - IOVA_OFFSET, e.gpa, e.size) for e in entries] == [
        (r.gpa, r.gpa, r.size) for r in ram.regions
    ]
    # A buffer straddling the two adjacent regions is one IOVA run (two entries behind it).
    assert iommu.iova_runs(1 * MiB - 100, 200) == [(IOVA_OFFSET + 1 * MiB - 100, 200)]


def test_shuffle_mode_splits_gpa_contiguous_buffers(ram):
    iommu = Iommu(ram, mode="shuffle", seed=3)
    runs = iommu.iova_runs(0, 8 * PAGE_SIZE)
    assert sum(length for _, length in runs) == 8 * PAGE_SIZE
    assert len(runs) > 1
    for iova, length in runs:
        assert iommu.translate(iova) is not None
    with pytest.raises(IommuFault):
        iommu.iova_contiguous(0, 8 * PAGE_SIZE)
    # Rings never cross a page, so they are one IOVA run whatever the permutation.
    ring = SplitRing(ram, 128, iommu=iommu)
    for addr, gpa in ((ring.desc_user_addr, ring.desc_gpa), (ring.used_user_addr, ring.used_gpa)):
        assert iommu.translate(addr) == gpa


def test_unmap_map_alias_and_permissions(ram):
    iommu = Iommu(ram)
    far = 0x6100_0000_0000
    iommu.map(far, 0x3000, PAGE_SIZE, IotlbPerm.RO)
    assert iommu.iova(0x3000) == IOVA_OFFSET + 0x3000  # the first mapping stays the driver's
    assert iommu.lookup_page(far + 5) == (0x3000, IotlbPerm.RO)
    with pytest.raises(IommuFault):
        iommu.map(far, 0x4000, PAGE_SIZE)
    assert iommu.unmap(IOVA_OFFSET + 0x3000, PAGE_SIZE) == 1
    assert iommu.iova(0x3000) == far  # the alias is what is left
    assert iommu.unmap(far, PAGE_SIZE) == 1
    with pytest.raises(IommuFault):
        iommu.iova(0x3000)
    iommu.set_perm(IOVA_OFFSET, PAGE_SIZE, IotlbPerm.RO)
    perms = {e.perm for e in iommu.entries() if e.gpa < 1 * MiB}
    assert perms == {IotlbPerm.RO, IotlbPerm.RW}
