"""Guest memory: regions mapped from the fds the front-end sends.

A region is known by three addresses: guest physical (``gpa``), the
front-end's own virtual address (``uva``: ring addresses arrive in it unless
ACCESS_PLATFORM is negotiated) and an offset in the fd. Translation returns
zero-copy ``memoryview`` slices of the mapping; a range that crosses regions
comes back as several slices, in order.

Unmapping never calls ``mmap.close()``: a queue worker may still hold a view
into a region being removed, and closing under it would be a use-after-unmap.
Dropping our reference instead lets the mapping go when the last view does.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from dataclasses import dataclass, field
from typing import Literal

from .errors import BadMemoryRegion, UnmappedAddress
from .peer_fd import PeerFdError, SealPolicy, map_peer_fd

PAGE_SIZE = mmap.PAGESIZE
U64_LIMIT = 1 << 64

AddressKind = Literal["gpa", "uva"]


@dataclass(eq=False)
class MappedRegion:
    """One region of guest memory mapped into this process."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    _mapping: mmap.mmap = field(repr=False)
    _view: memoryview = field(repr=False)
    host_address: int = 0  # where the region starts in this process (dirty logging)
    shrink_sealed: bool = True  # False: the front-end could truncate it under us (peer_fd)

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.size

    @property
    def uva_end(self) -> int:
        return self.user_addr + self.size

    def slice(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    def describe(self) -> str:
        return (
            f"gpa {self.guest_phys_addr:#x}-{self.gpa_end - 1:#x} "
            f"uva {self.user_addr:#x} size {self.size:#x} ({self.size >> 20} MiB) "
            f"fd offset {self.mmap_offset:#x}"
        )


def map_region(
    fd: int, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int,
    seal: SealPolicy = SealPolicy.TRY,
) -> MappedRegion:
    """Map ``size`` bytes of ``fd`` at ``mmap_offset``, shared, read-write.

    The fd is not closed here (the caller owns it). Raises ``BadMemoryRegion``
    when the fd cannot be mapped safely (not a file, too small, not writable,
    not sealable against shrinking under ``SealPolicy.REQUIRE``: see peer_fd).
    """
    if size <= 0:
        raise BadMemoryRegion(f"region of size {size}")
    if guest_phys_addr + size > U64_LIMIT or user_addr + size > U64_LIMIT:
        raise BadMemoryRegion("region wraps past 2**64")
    try:
        peer = map_peer_fd(fd, mmap_offset, size, f"memory region at gpa {guest_phys_addr:#x}",
                           seal)
    except PeerFdError as exc:
        raise BadMemoryRegion(str(exc)) from None
    host_address = ctypes.addressof(ctypes.c_char.from_buffer(peer.view))
    return MappedRegion(guest_phys_addr, size, user_addr, mmap_offset, peer.mapping, peer.view,
                        host_address, peer.shrink_sealed)


class GuestMemory:
    """The memory table: regions indexed by guest physical and user address."""

    def __init__(self, max_regions: int = 32) -> None:
        self.max_regions = max_regions
        self._by_gpa: list[MappedRegion] = []
        self._gpa_starts: list[int] = []
        self._by_uva: list[MappedRegion] = []
        self._uva_starts: list[int] = []
        self.generation = 0  # bumped on every change; queues re-resolve rings on change

    # -- table changes -------------------------------------------------------
    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._by_gpa)

    def __len__(self) -> int:
        return len(self._by_gpa)

    def total_bytes(self) -> int:
        return sum(r.size for r in self._by_gpa)

    def add(self, region: MappedRegion) -> None:
        """Insert a mapped region; refuses overlap in either address space."""
        if len(self._by_gpa) >= self.max_regions:
            raise BadMemoryRegion(f"memory table full ({self.max_regions} regions)")
        for other in self._by_gpa:
            if _overlaps(region.guest_phys_addr, region.size, other.guest_phys_addr, other.size):
                raise BadMemoryRegion(
                    f"region at gpa {region.guest_phys_addr:#x} overlaps {other.describe()}"
                )
            if _overlaps(region.user_addr, region.size, other.user_addr, other.size):
                raise BadMemoryRegion(
                    f"region at uva {region.user_addr:#x} overlaps {other.describe()}"
                )
        self._insert(self._by_gpa, self._gpa_starts, region, region.guest_phys_addr)
        self._insert(self._by_uva, self._uva_starts, region, region.user_addr)
        self.generation += 1

    def remove(self, guest_phys_addr: int, size: int, user_addr: int) -> MappedRegion:
        """Remove the region with exactly these addresses (REM_MEM_REG)."""
        for region in self._by_gpa:
            if (
                region.guest_phys_addr == guest_phys_addr
                and region.size == size
                and region.user_addr == user_addr
            ):
                i = self._by_gpa.index(region)
                del self._by_gpa[i], self._gpa_starts[i]
                j = self._by_uva.index(region)
                del self._by_uva[j], self._uva_starts[j]
                self.generation += 1
                return region
        raise BadMemoryRegion(
            f"no region gpa {guest_phys_addr:#x} size {size:#x} uva {user_addr:#x} to remove"
        )

    def clear(self) -> None:
        self._by_gpa.clear()
        self._gpa_starts.clear()
        self._by_uva.clear()
        self._uva_starts.clear()
        self.generation += 1

    @staticmethod
    def _insert(
        table: list[MappedRegion], starts: list[int], region: MappedRegion, start: int
    ) -> None:
        i = bisect.bisect_left(starts, start)
        starts.insert(i, start)
        table.insert(i, region)

    # -- translation ---------------------------------------------------------
    def views(self, kind: AddressKind, addr: int, length: int) -> list[memoryview]:
        """Zero-copy views covering ``[addr, addr+length)``; raises ``UnmappedAddress``.

        ``kind`` is "gpa" (descriptor buffers) or "uva" (ring addresses).
        """
        table, starts = (
            (self._by_gpa, self._gpa_starts) if kind == "gpa" else (self._by_uva, self._uva_starts)
        )
        # The common case first (one request buffer, inside one region): one
        # bisect and one slice. Anything else takes the checked path below.
        if length > 0 and addr >= 0:
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0:
                offset = addr - starts[i]
                region = table[i]
                if offset + length <= region.size:
                    return [region._view[offset : offset + length]]
        if length < 0 or addr < 0 or addr + length > U64_LIMIT:
            raise UnmappedAddress(kind, addr, length, "range wraps past 2**64")
        if length == 0:
            return []
        out: list[memoryview] = []
        cursor, remaining = addr, length
        while remaining:
            i = bisect.bisect_right(starts, cursor) - 1
            if i < 0:
                raise UnmappedAddress(kind, addr, length, f"{cursor:#x} is below every region")
            region = table[i]
            base = starts[i]
            if cursor >= base + region.size:
                raise UnmappedAddress(kind, addr, length, f"{cursor:#x} is in no region")
            offset = cursor - base
            take = min(remaining, region.size - offset)
            out.append(region.slice(offset, take))
            cursor += take
            remaining -= take
        return out

    def view(self, kind: AddressKind, addr: int, length: int) -> memoryview:
        """One contiguous view (rings must not cross regions); raises ``UnmappedAddress``."""
        parts = self.views(kind, addr, length)
        if len(parts) != 1:
            if not parts:
                return memoryview(b"")
            raise UnmappedAddress(kind, addr, length, "range crosses a region boundary")
        return parts[0]

    def gpa_of_host_address(self, address: int) -> int | None:
        """The guest physical address of a byte of this process's mappings, if any."""
        for region in self._by_gpa:
            if region.host_address <= address < region.host_address + region.size:
                return region.guest_phys_addr + (address - region.host_address)
        return None

    def uva_to_gpa(self, user_addr: int) -> int:
        """The guest physical address of a front-end virtual address (for dirty logging)."""
        i = bisect.bisect_right(self._uva_starts, user_addr) - 1
        if i >= 0:
            region = self._by_uva[i]
            if user_addr < region.uva_end:
                return region.guest_phys_addr + (user_addr - region.user_addr)
        raise UnmappedAddress("uva", user_addr, 1, "not in any region")

    def gpa_range_of_uva(self, user_addr: int, length: int) -> int:
        """The guest physical address of ``[user_addr, user_addr+length)``, which must
        be one range in guest physical space too (it may cross regions that are
        adjacent in both); raises ``UnmappedAddress`` otherwise."""
        if length <= 0:
            raise UnmappedAddress("uva", user_addr, length, "empty range")
        start = self.uva_to_gpa(user_addr)
        cursor, expected_gpa, end = user_addr, start, user_addr + length
        while cursor < end:
            i = bisect.bisect_right(self._uva_starts, cursor) - 1
            region = self._by_uva[i] if i >= 0 else None
            if region is None or cursor >= region.uva_end:
                raise UnmappedAddress("uva", user_addr, length, f"{cursor:#x} is in no region")
            gpa = region.guest_phys_addr + (cursor - region.user_addr)
            if gpa != expected_gpa:
                raise UnmappedAddress("uva", user_addr, length,
                                      f"not contiguous in guest physical space at {cursor:#x}")
            take = min(end, region.uva_end) - cursor
            cursor += take
            expected_gpa += take
        return start


def _overlaps(a: int, a_len: int, b: int, b_len: int) -> bool:
    return a < b + b_len and b < a + a_len


def views_after(views: list[memoryview], skip: int) -> list[memoryview]:
    """The views that remain after the first ``skip`` bytes of ``views`` (no copy)."""
    out: list[memoryview] = []
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        out.append(view[skip:] if skip else view)
        skip = 0
    return out
