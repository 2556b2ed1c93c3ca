"""Guest RAM of the reference front-end: memfd shared memory cut into regions.

Each region has three addresses, deliberately all different, so that a
backend confusing them fails loudly instead of working by accident:

* ``gpa``: guest physical address (descriptor buffers use it);
* ``user_addr``: a fake front-end virtual address (ring addresses use it);
  ``gpa + UVA_BASE + index * UVA_REGION_STRIDE``, so two regions adjacent in
  gpa are *not* adjacent in user address space;
* ``fd`` + ``mmap_offset``: where the region lives in its memfd. Regions share
  one memfd by default, with a guard page between them, so adjacent regions
  are not adjacent in the file either.

The default layout has two gpa-adjacent regions (a buffer can straddle their
boundary) and a third one after a hole.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..wire import MemRegion
from .errors import FrontendError

PAGE_SIZE = mmap.PAGESIZE
MiB = 1 << 20
GiB = 1 << 30
UVA_BASE = 0x7F00_0000_0000
UVA_REGION_STRIDE = 0x10_0000_0000  # 64 GiB between regions' user addresses
# (gpa, size) of each region: two adjacent, then a hole up to 4 GiB.
DEFAULT_LAYOUT: tuple[tuple[int, int], ...] = (
    (0, 16 * MiB),
    (16 * MiB, 16 * MiB),
    (4 * GiB, 16 * MiB),
)


class GuestRamError(FrontendError):
    """An access or allocation outside guest RAM."""


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(eq=False)
class RamRegion:
    """One region of guest RAM, as sent to the backend."""

    index: int
    gpa: int
    size: int
    user_addr: int
    fd: int
    mmap_offset: int
    view: memoryview = field(repr=False)

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa_end

    def mem_region(self) -> MemRegion:
        """The wire form (ADD_MEM_REG / SET_MEM_TABLE entry)."""
        return MemRegion(self.gpa, self.size, self.user_addr, self.mmap_offset)


class GuestRam:
    """Shared guest RAM with gpa accessors and a first-fit allocator.

    ``separate_fds=True`` gives each region its own memfd (mmap offset 0 then,
    except for the guard page); by default all regions share one memfd.
    ``uva_base``: where the fake user addresses start (another front-end process,
    e.g. a migration destination, has the same guest memory at other addresses).
    """

    def __init__(
        self,
        layout: Sequence[tuple[int, int]] = DEFAULT_LAYOUT,
        *,
        separate_fds: bool = False,
        name: str = "pyvhost-guest-ram",
        uva_base: int = UVA_BASE,
    ) -> None:
        spans = sorted(layout)
        for (gpa, size), (next_gpa, _) in zip(spans, spans[1:]):
            if gpa + size > next_gpa:
                raise GuestRamError(f"regions at {gpa:#x} and {next_gpa:#x} overlap")
        for gpa, size in spans:
            if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise GuestRamError(f"region {gpa:#x}+{size:#x} is not page aligned")
        self.uva_base = uva_base
        self._fds: list[int] = []
        self._mappings: list[mmap.mmap] = []
        self.regions: list[RamRegion] = []
        if separate_fds:
            for index, (gpa, size) in enumerate(spans):
                # A guard page in front, so mmap_offset is never 0 either.
                fd, mapping = self._new_memfd(name, PAGE_SIZE + size)
                self._add_region(index, gpa, size, fd, PAGE_SIZE, mapping)
        else:
            total = sum(size + PAGE_SIZE for _, size in spans)
            fd, mapping = self._new_memfd(name, total)
            offset = PAGE_SIZE
            for index, (gpa, size) in enumerate(spans):
                self._add_region(index, gpa, size, fd, offset, mapping)
                offset += size + PAGE_SIZE
        # Free gpa ranges [start, end), sorted; gpa-adjacent regions form one range.
        self._free: list[tuple[int, int]] = []
        for region in self.regions:
            if self._free and self._free[-1][1] == region.gpa:
                self._free[-1] = (self._free[-1][0], region.gpa_end)
            else:
                self._free.append((region.gpa, region.gpa_end))
        self._allocated: dict[int, int] = {}  # gpa -> size

    def _new_memfd(self, name: str, size: int) -> tuple[int, mmap.mmap]:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._fds.append(fd)
        os.ftruncate(fd, size)
        # As QEMU's memory-backend-memfd does by default (seal=on): the size is final.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._mappings.append(mapping)
        return fd, mapping

    def _add_region(
        self, index: int, gpa: int, size: int, fd: int, offset: int, mapping: mmap.mmap
    ) -> None:
        view = memoryview(mapping)[offset : offset + size]
        user_addr = self.uva_base + index * UVA_REGION_STRIDE + gpa
        self.regions.append(RamRegion(index, gpa, size, user_addr, fd, offset, view))

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        for region in self.regions:
            region.view.release()
        for mapping in self._mappings:
            try:
                mapping.close()
            except BufferError:
                # A caller still holds a view (a ring, a ``view()`` result): the
                # mapping goes when the last view does; closing under it would crash.
                pass
        for fd in self._fds:
            os.close(fd)
        self._mappings.clear()
        self._fds.clear()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addressing ----------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> RamRegion:
        """The single region holding ``[gpa, gpa+length)``."""
        for region in self.regions:
            if region.contains(gpa, max(length, 1)):
                return region
        raise GuestRamError(f"gpa range {gpa:#x}+{length:#x} is not inside one region")

    def uva(self, gpa: int, length: int = 1) -> int:
        """The front-end user address of ``gpa`` (the range must sit in one region)."""
        region = self.region_of(gpa, length)
        return region.user_addr + (gpa - region.gpa)

    def boundaries(self) -> list[int]:
        """gpas where one region ends and the next begins (no hole): straddle points."""
        return [a.gpa_end for a, b in zip(self.regions, self.regions[1:]) if a.gpa_end == b.gpa]

    def _pieces(self, gpa: int, length: int) -> list[memoryview]:
        pieces: list[memoryview] = []
        cursor, end = gpa, gpa + length
        while cursor < end:
            region = self.region_of(cursor)
            take = min(end, region.gpa_end) - cursor
            start = cursor - region.gpa
            pieces.append(region.view[start : start + take])
            cursor += take
        return pieces

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of a range inside one region."""
        region = self.region_of(gpa, length)
        start = gpa - region.gpa
        return region.view[start : start + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes at ``gpa``; the range may cross gpa-adjacent regions, not a hole."""
        return b"".join(bytes(p) for p in self._pieces(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        done = 0
        for piece in self._pieces(gpa, len(data)):
            piece[:] = data[done : done + len(piece)]
            done += len(piece)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        for piece in self._pieces(gpa, length):
            piece[:] = bytes([byte]) * len(piece)

    # -- allocation ----------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """First fit, inside one region (rings need contiguous user addresses)."""
        if size <= 0:
            raise GuestRamError(f"allocation of {size} bytes")
        for start, end in self._free:
            candidate = align_up(start, align)
            while candidate + size <= end:
                region = self.region_of(candidate)
                if candidate + size <= region.gpa_end:
                    self._take(candidate, size)
                    return candidate
                candidate = align_up(region.gpa_end, align)  # do not straddle: next region
        raise GuestRamError(f"out of guest RAM for {size} bytes (align {align})")

    def alloc_at(self, gpa: int, size: int) -> int:
        """Reserve exactly ``[gpa, gpa+size)`` (e.g. across a region boundary)."""
        self._take(gpa, size)
        return gpa

    def alloc_straddling(self, size: int, boundary: int | None = None) -> int:
        """A buffer with half of it before ``boundary`` (default: the first) and half after."""
        if boundary is None:
            points = self.boundaries()
            if not points:
                raise GuestRamError("no two regions are adjacent: nothing to straddle")
            boundary = points[0]
        if size < 2:
            raise GuestRamError("a straddling buffer needs at least 2 bytes")
        return self.alloc_at(boundary - size // 2, size)

    def _take(self, gpa: int, size: int) -> None:
        for i, (start, end) in enumerate(self._free):
            if start <= gpa and gpa + size <= end:
                replacement = [(s, e) for s, e in ((start, gpa), (gpa + size, end)) if e > s]
                self._free[i : i + 1] = replacement
                self._allocated[gpa] = size
                return
        raise GuestRamError(f"gpa range {gpa:#x}+{size:#x} is not free guest RAM")

    def free(self, gpa: int) -> None:
        size = self._allocated.pop(gpa, None)
        if size is None:
            raise GuestRamError(f"{gpa:#x} was not allocated")
        self._free.append((gpa, gpa + size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, end in self._free:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self._free = merged

    @property
    def allocated_bytes(self) -> int:
        return sum(self._allocated.values())
