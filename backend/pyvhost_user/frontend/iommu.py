"""The guest's IOMMU as the front-end sees it: IOVA pages -> guest physical pages.

With VIRTIO_F_ACCESS_PLATFORM negotiated, every address the device sees (ring
addresses in SET_VRING_ADDR, descriptor addresses, indirect tables) is an
IOVA. ``Iommu`` holds the page table a guest's vIOMMU driver would build:
one entry per page, each with a permission (``IotlbPerm``). Two layouts:

* ``mode="offset"``: ``iova = gpa + offset`` for every page (``offset=0`` is
  the identity, what an ASID in its default passthrough state does);
* ``mode="shuffle"``: within each RAM region, pages are permuted (seeded), so
  a gpa-contiguous buffer is not IOVA-contiguous and the driver must split
  it into one descriptor per IOVA run.

The back-end never sees this table. It sees what the front-end sends: IOTLB
UPDATEs whose target is the *front-end user address* of the gpa (QEMU's
``vhost_device_iotlb_miss``), for one page in answer to a miss or for whole
coalesced runs when pre-mapping (``entries``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

from ..wire import IotlbPerm
from .errors import FrontendError
from .guest_ram import PAGE_SIZE, GuestRam

# Far from any gpa the default layout uses (and far below 2**64): an IOVA that
# a back-end used as a gpa, or a gpa used as an IOVA, fails loudly.
IOVA_OFFSET: Final = 0x5A00_0000_0000
PAGE_MASK: Final = PAGE_SIZE - 1

IommuMode = Literal["offset", "shuffle"]


class IommuFault(FrontendError):
    """A gpa with no IOVA, or an IOVA with no page, where the driver needs one."""


@dataclass(frozen=True)
class IommuEntry:
    """A run of pages contiguous in IOVA, in gpa and inside one RAM region, one permission."""

    iova: int
    gpa: int
    size: int
    perm: IotlbPerm

    @property
    def iova_end(self) -> int:
        return self.iova + self.size


class Iommu:
    """A page-granular IOVA -> gpa table with permissions (and the reverse, for the driver)."""

    def __init__(
        self,
        ram: GuestRam,
        *,
        mode: IommuMode = "offset",
        offset: int = IOVA_OFFSET,
        seed: int = 0,
        perm: IotlbPerm = IotlbPerm.RW,
        map_all: bool = True,
    ) -> None:
        if offset & PAGE_MASK:
            raise IommuFault(f"IOVA offset {offset:#x} is not page aligned")
        self.ram = ram
        self.mode = mode
        self.offset = offset
        self._pages: dict[int, tuple[int, IotlbPerm]] = {}  # iova page -> (gpa page, perm)
        # gpa page -> its iova pages, first one first (the driver's view; aliases after)
        self._reverse: dict[int, list[int]] = {}
        if not map_all:
            return
        rng = random.Random(seed)
        for region in ram.regions:
            gpas = list(range(region.gpa, region.gpa_end, PAGE_SIZE))
            iovas = [gpa + offset for gpa in gpas]
            if mode == "shuffle":
                rng.shuffle(iovas)
            elif mode != "offset":
                raise IommuFault(f"unknown IOMMU mode {mode!r}")
            for gpa, iova in zip(gpas, iovas):
                self.map(iova, gpa, PAGE_SIZE, perm)

    @classmethod
    def identity(cls, ram: GuestRam) -> Iommu:
        """iova == gpa everywhere: what an ASID's passthrough default stands for."""
        return cls(ram, mode="offset", offset=0)

    # -- the guest driver changing its page table -------------------------------
    def map(self, iova: int, gpa: int, size: int, perm: IotlbPerm = IotlbPerm.RW) -> None:
        """Map ``size`` bytes (whole pages) at ``iova`` onto guest RAM at ``gpa``."""
        if (iova | gpa | size) & PAGE_MASK or size <= 0:
            raise IommuFault(f"map {iova:#x} -> {gpa:#x} +{size:#x} is not page aligned")
        self.ram.region_of(gpa, size)  # inside one region, or GuestRamError
        for done in range(0, size, PAGE_SIZE):
            if iova + done in self._pages:
                raise IommuFault(f"iova {iova + done:#x} is already mapped")
        for done in range(0, size, PAGE_SIZE):
            self._pages[iova + done] = (gpa + done, IotlbPerm(perm))
            self._reverse.setdefault(gpa + done, []).append(iova + done)

    def unmap(self, iova: int, size: int) -> int:
        """Remove the pages of ``[iova, iova+size)``; return how many were mapped."""
        first = iova & ~PAGE_MASK
        removed = 0
        for page in range(first, iova + size, PAGE_SIZE):
            hit = self._pages.pop(page, None)
            if hit is None:
                continue
            removed += 1
            aliases = self._reverse[hit[0]]
            aliases.remove(page)
            if not aliases:
                del self._reverse[hit[0]]
        return removed

    def set_perm(self, iova: int, size: int, perm: IotlbPerm) -> None:
        for page in range(iova & ~PAGE_MASK, iova + size, PAGE_SIZE):
            gpa, _ = self.lookup_page(page)
            self._pages[page] = (gpa, IotlbPerm(perm))

    # -- what the device side asks (the miss path) --------------------------------
    def lookup_page(self, iova: int) -> tuple[int, IotlbPerm]:
        """(gpa of the page, perm) for the page holding ``iova``; IommuFault if unmapped."""
        hit = self._pages.get(iova & ~PAGE_MASK)
        if hit is None:
            raise IommuFault(f"iova {iova:#x} is not mapped")
        return hit

    def translate(self, iova: int) -> int | None:
        hit = self._pages.get(iova & ~PAGE_MASK)
        return None if hit is None else hit[0] + (iova & PAGE_MASK)

    def perm_of(self, iova: int) -> IotlbPerm:
        return self.lookup_page(iova)[1]

    # -- what the driver writes into rings --------------------------------------------
    def iova(self, gpa: int) -> int:
        pages = self._reverse.get(gpa & ~PAGE_MASK)
        if not pages:
            raise IommuFault(f"gpa {gpa:#x} has no IOVA")
        return pages[0] + (gpa & PAGE_MASK)

    def iova_runs(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """``[(iova, length), ...]`` covering ``[gpa, gpa+length)``, split where IOVA jumps."""
        runs: list[tuple[int, int]] = []
        cursor, end = gpa, gpa + length
        while cursor < end:
            take = min(end, (cursor & ~PAGE_MASK) + PAGE_SIZE) - cursor
            iova = self.iova(cursor)
            if runs and runs[-1][0] + runs[-1][1] == iova:
                runs[-1] = (runs[-1][0], runs[-1][1] + take)
            else:
                runs.append((iova, take))
            cursor += take
        return runs

    def iova_contiguous(self, gpa: int, length: int) -> int:
        """The IOVA of a range that must be one IOVA run (a ring, an indirect table)."""
        runs = self.iova_runs(gpa, max(length, 1))
        if len(runs) != 1:
            raise IommuFault(
                f"gpa {gpa:#x}+{length:#x} is {len(runs)} IOVA runs; it must be one"
            )
        return runs[0][0]

    # -- pre-mapping --------------------------------------------------------------------
    def entries(self) -> Iterator[IommuEntry]:
        """The table as few entries as possible (contiguous in IOVA and gpa, same region,
        same perm): what a front-end pre-maps with one UPDATE each."""
        run: IommuEntry | None = None
        for iova in sorted(self._pages):
            gpa, perm = self._pages[iova]
            if (
                run is not None
                and run.iova_end == iova
                and run.gpa + run.size == gpa
                and run.perm == perm
                and self.ram.region_of(run.gpa).contains(gpa)
            ):
                run = IommuEntry(run.iova, run.gpa, run.size + PAGE_SIZE, perm)
                continue
            if run is not None:
                yield run
            run = IommuEntry(iova, gpa, PAGE_SIZE, perm)
        if run is not None:
            yield run

    def __len__(self) -> int:
        return len(self._pages)


class LinearIommu(Iommu):
    """``iova = gpa + offset`` over all of guest RAM, computed, never tabulated.

    ``Iommu`` keeps a dict entry per page: right for shuffled tables and guest
    unmaps, unusable for a 128 GiB guest (33 million pages). This one answers
    the same questions by arithmetic, and pre-maps in ``chunk``-sized UPDATEs
    (a VMM maps RAM region by region; hardware pins a GiB at a time), so the
    migration-flow lab can map huge sparse guests. Its table cannot change.
    """

    def __init__(self, ram: GuestRam, *, offset: int = IOVA_OFFSET, chunk: int = 1 << 30,
                 perm: IotlbPerm = IotlbPerm.RW) -> None:
        super().__init__(ram, mode="offset", offset=offset, perm=perm, map_all=False)
        if chunk <= 0 or chunk & PAGE_MASK:
            raise IommuFault(f"chunk {chunk:#x} is not a positive number of pages")
        self.chunk = chunk
        self.perm = IotlbPerm(perm)

    def _gpa_of(self, iova: int) -> int:
        gpa = iova - self.offset
        try:
            self.ram.region_of(gpa)
        except FrontendError:
            raise IommuFault(f"iova {iova:#x} is not mapped") from None
        return gpa

    def map(self, iova: int, gpa: int, size: int, perm: IotlbPerm = IotlbPerm.RW) -> None:
        raise IommuFault("a LinearIommu maps all of RAM, always")

    def unmap(self, iova: int, size: int) -> int:
        raise IommuFault("a LinearIommu maps all of RAM, always")

    def set_perm(self, iova: int, size: int, perm: IotlbPerm) -> None:
        raise IommuFault("a LinearIommu maps all of RAM, always")

    def lookup_page(self, iova: int) -> tuple[int, IotlbPerm]:
        return self._gpa_of(iova & ~PAGE_MASK), self.perm

    def translate(self, iova: int) -> int | None:
        try:
            return self._gpa_of(iova)
        except IommuFault:
            return None

    def iova(self, gpa: int) -> int:
        try:
            self.ram.region_of(gpa)
        except FrontendError:
            raise IommuFault(f"gpa {gpa:#x} has no IOVA") from None
        return gpa + self.offset

    def iova_runs(self, gpa: int, length: int) -> list[tuple[int, int]]:
        self.iova(gpa)
        self.iova(gpa + max(length, 1) - 1)
        return [(gpa + self.offset, length)]

    def entries(self) -> Iterator[IommuEntry]:
        for region in self.ram.regions:
            for start in range(region.gpa, region.gpa_end, self.chunk):
                size = min(self.chunk, region.gpa_end - start)
                yield IommuEntry(start + self.offset, start, size, self.perm)

    def __len__(self) -> int:
        return sum(region.size for region in self.ram.regions) // PAGE_SIZE
