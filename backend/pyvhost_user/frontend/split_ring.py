"""The driver side of a virtio 1.x split virtqueue, laid out in ``GuestRam``.

Layout (virtio 1.x, 2.7): descriptor table (16 bytes per entry, 16-aligned),
avail ring (``flags, idx, ring[N], used_event``, 2-aligned), used ring
(``flags, idx, ring[N] of {id, len}, avail_event``, 4-aligned). All fields are
little endian. Indices are free-running u16 counters; slot = index % N, which is
why N must be a power of 2.

Memory ordering: the driver must make ring entries visible before the index
that publishes them, and write ``used_event`` before re-reading ``used.idx``.
CPython cannot emit fences; each step below is a separate interpreter-level
store through the shared mapping, in program order, and x86-64 keeps stores in
order. The used_event/used.idx store->load pair is the only one x86 may
reorder; the re-check after writing used_event (hundreds of instructions
later) makes a missed interrupt practically impossible, and a real miss would
show as a ``FrontendTimeout``, never as silent corruption.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from .errors import ProtocolViolation, RingError
from .guest_ram import PAGE_SIZE, GuestRam

if TYPE_CHECKING:
    from .iommu import Iommu

DESC: Final = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM: Final = struct.Struct("<II")  # id, len

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4
MAX_QUEUE_SIZE: Final = 32768


class Segment(NamedTuple):
    """One buffer of a chain: guest physical address, length, device-writable?"""

    gpa: int
    length: int
    device_writable: bool


class Descriptor(NamedTuple):
    addr: int
    length: int
    flags: int
    next: int


@dataclass
class _Chain:
    descriptors: list[int]  # ring descriptor ids to give back on completion
    indirect_table: int | None  # gpa of the indirect table to free, if any


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did [old, new) pass ``event``? (u16 arithmetic)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def dma_align(size: int, align: int) -> int:
    """An alignment that keeps ``size`` bytes inside one page (page alignment if bigger)."""
    if size >= PAGE_SIZE:
        return max(align, PAGE_SIZE)
    return max(align, 1 << (size - 1).bit_length())


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail ring and used ring (with the event fields)."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class RingDma:
    """Where a ring's structures and buffers are placed, and the addresses the
    device is given for them: gpas and front-end user addresses, or IOVAs when
    ``iommu`` is set. Shared by the split and packed rings."""

    ram: GuestRam
    iommu: Iommu | None

    def _alloc(self, size: int, align: int) -> int:
        """With an IOMMU, a structure of at most a page never crosses a page (so it
        is one IOVA run whatever the page table); a bigger one starts on a page."""
        if self.iommu is not None:
            return self.ram.alloc(size, dma_align(size, align))
        return self.ram.alloc(size, align)

    # Without an IOMMU ring addresses are front-end user addresses (what QEMU
    # sends in SET_VRING_ADDR); with one, IOVAs (QEMU's vhost_memory_map returns
    # the IOVA itself then).
    def _ring_addr(self, gpa: int, length: int) -> int:
        if self.iommu is not None:
            return self.iommu.iova_contiguous(gpa, length)
        return self.ram.uva(gpa)

    def dma_segments(
        self, segments: Sequence[tuple[int, int, bool]]
    ) -> list[tuple[int, int, bool]]:
        """gpa segments as the device must see them: IOVA runs with an IOMMU, else as is."""
        if self.iommu is None:
            return [tuple(s) for s in segments]  # type: ignore[misc]
        out: list[tuple[int, int, bool]] = []
        for gpa, length, writable in segments:
            if length == 0:
                out.append((self.iommu.iova(gpa), 0, writable))
                continue
            out.extend((iova, run, writable) for iova, run in self.iommu.iova_runs(gpa, length))
        return out


class SplitRing(RingDma):
    """Descriptor table, avail and used rings of one queue, driven from the driver side.

    ``start_index`` starts avail.idx and used.idx there (the base to send with
    SET_VRING_BASE), so tests can reach the u16 wrap-around quickly.

    ``iommu`` (ACCESS_PLATFORM): the ring addresses and every descriptor address
    are IOVAs through it; a buffer that is several IOVA runs becomes several
    descriptors. It may be swapped (``ring.iommu = ...``) while the ring is
    stopped, e.g. when its group moves to another address space.
    """

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        start_index: int = 0,
        iommu: Iommu | None = None,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise RingError(f"split ring size {size} is not a power of 2 in 1..32768")
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.iommu = iommu
        desc_bytes, avail_bytes, used_bytes = ring_sizes(size)
        self._sizes = (desc_bytes, avail_bytes, used_bytes)
        self.desc_gpa = self._alloc(desc_bytes, DESC_ALIGN)
        self.avail_gpa = self._alloc(avail_bytes, AVAIL_ALIGN)
        self.used_gpa = self._alloc(used_bytes, USED_ALIGN)
        self._desc = ram.view(self.desc_gpa, desc_bytes)
        self._avail = ram.view(self.avail_gpa, avail_bytes)
        self._used = ram.view(self.used_gpa, used_bytes)
        # The u16 fields the device reads or writes concurrently go through
        # typed views: one 16-bit load or store each. struct.pack_into first
        # zeroes the field then writes it byte by byte, so the other side can
        # see 0 or a torn index (seen: "used.idx 0" with several queues busy).
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self.reset(start_index)

    # -- lifetime ------------------------------------------------------------
    def reset(self, start_index: int = 0) -> None:
        """What a driver does on (re)initialisation: zeroed rings, every descriptor free."""
        for chain in getattr(self, "_outstanding", {}).values():
            if chain.indirect_table is not None:
                self.ram.free(chain.indirect_table)
        for view in (self._desc, self._avail, self._used):
            view[:] = bytes(len(view))
        self._free: deque[int] = deque(range(self.size))
        self._outstanding: dict[int, _Chain] = {}
        self.shadow_avail_idx = start_index & 0xFFFF  # next avail slot to fill
        self.published_avail_idx = self.shadow_avail_idx  # what avail.idx says
        self.last_used_idx = self.shadow_avail_idx  # next used entry to consume
        self.avail_idx = self.shadow_avail_idx
        self.used_idx = self.shadow_avail_idx

    @property
    def start_base(self) -> int:
        """The SET_VRING_BASE value for (re)starting the ring: the used index, as QEMU
        sends it (read from guest memory)."""
        return self.last_used_idx

    def release(self) -> None:
        """Give the ring's memory back to the allocator (the ring is unusable after)."""
        self.reset()
        for view in (self._avail16, self._used16, self._desc, self._avail, self._used):
            view.release()
        for gpa in (self.desc_gpa, self.avail_gpa, self.used_gpa):
            self.ram.free(gpa)

    # -- addresses for SET_VRING_ADDR ----------------------------------------
    @property
    def desc_user_addr(self) -> int:
        return self._ring_addr(self.desc_gpa, self._sizes[0])

    @property
    def avail_user_addr(self) -> int:
        return self._ring_addr(self.avail_gpa, self._sizes[1])

    @property
    def used_user_addr(self) -> int:
        return self._ring_addr(self.used_gpa, self._sizes[2])

    # -- raw field access (tests may corrupt anything) -----------------------
    def write_descriptor(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        DESC.pack_into(self._desc, 16 * index, addr, length, flags, next_)

    def read_descriptor(self, index: int) -> Descriptor:
        return Descriptor(*DESC.unpack_from(self._desc, 16 * index))

    @property
    def avail_flags(self) -> int:
        return self._avail16[0]

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self._avail16[0] = value

    @property
    def avail_idx(self) -> int:
        return self._avail16[1]

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self._avail16[1] = value & 0xFFFF

    def avail_entry(self, slot: int) -> int:
        return self._avail16[2 + slot]

    def set_avail_entry(self, slot: int, head: int) -> None:
        self._avail16[2 + slot] = head

    @property
    def used_event(self) -> int:
        return self._avail16[2 + self.size]

    @used_event.setter
    def used_event(self, value: int) -> None:
        self._avail16[2 + self.size] = value & 0xFFFF

    @property
    def used_flags(self) -> int:
        return self._used16[0]

    @property
    def used_idx(self) -> int:
        return self._used16[1]

    @used_idx.setter
    def used_idx(self, value: int) -> None:  # only the initial value: the device owns it
        self._used16[1] = value & 0xFFFF

    def used_entry(self, slot: int) -> tuple[int, int]:
        return USED_ELEM.unpack_from(self._used, 4 + 8 * slot)

    @property
    def avail_event(self) -> int:
        return self._used16[2 + 4 * self.size]

    # -- driver operations ---------------------------------------------------
    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def take_descriptors(self, count: int) -> list[int]:
        """Remove ``count`` ids from the free list (for hand-written chains)."""
        if count > len(self._free):
            raise RingError(f"{count} descriptors wanted, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def give_back_descriptors(self, ids: Sequence[int]) -> None:
        """Return ids ``take_descriptors`` gave, once no chain of theirs is in flight."""
        self._free.extend(ids)

    def add_chain(
        self,
        segments: Sequence[tuple[int, int, bool]],
        indirect: bool = False,
        *,
        translate: bool = True,
    ) -> int:
        """Write a chain and queue its head in the avail ring (not yet published).

        Segments are gpas; with an IOMMU they are written as IOVAs (one
        descriptor per IOVA run). ``translate=False`` writes the addresses as
        given (a test that picks its own IOVAs).
        """
        if not segments:
            raise RingError("a chain needs at least one buffer")
        if translate:
            segments = self.dma_segments(segments)
        table: int | None = None
        if indirect:
            table = self._alloc(16 * len(segments), DESC_ALIGN)
            entries = bytearray()
            for i, (gpa, length, writable) in enumerate(segments):
                flags = VIRTQ_DESC_F_WRITE if writable else 0
                last = i == len(segments) - 1
                if not last:
                    flags |= VIRTQ_DESC_F_NEXT
                entries += DESC.pack(gpa, length, flags, 0 if last else i + 1)
            self.ram.write(table, entries)
            ids = self.take_descriptors(1)
            table_addr = table
            if self.iommu is not None:
                table_addr = self.iommu.iova_contiguous(table, len(entries))
            self.write_descriptor(ids[0], table_addr, len(entries), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            ids = self.take_descriptors(len(segments))
            for i, (gpa, length, writable) in enumerate(segments):
                flags = VIRTQ_DESC_F_WRITE if writable else 0
                next_ = 0
                if i + 1 < len(ids):
                    flags |= VIRTQ_DESC_F_NEXT
                    next_ = ids[i + 1]
                self.write_descriptor(ids[i], gpa, length, flags, next_)
        self.push_avail(ids[0], ids, table)
        return ids[0]

    def push_avail(
        self, head: int, owned: Sequence[int] = (), indirect_table: int | None = None
    ) -> None:
        """Queue ``head`` in the avail ring; ``owned`` descriptors come back when it is used.

        Raw form for hand-written (possibly corrupt) chains: ``head`` need not be valid.
        """
        self.set_avail_entry(self.shadow_avail_idx % self.size, head & 0xFFFF)
        self.shadow_avail_idx = (self.shadow_avail_idx + 1) & 0xFFFF
        self._outstanding[head] = _Chain(list(owned), indirect_table)

    def publish(self) -> bool:
        """Move avail.idx over the queued heads; True if the device wants a kick."""
        old, new = self.published_avail_idx, self.shadow_avail_idx
        self.avail_idx = new  # after the ring entries (stores stay ordered on x86)
        self.published_avail_idx = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(self.avail_event, new, old)
        return not self.used_flags & VIRTQ_USED_F_NO_NOTIFY

    def pop_used(self) -> list[tuple[int, int]]:
        """Consume new used entries: ``[(head, len), ...]``, descriptors recycled.

        Raises ``ProtocolViolation`` when the device returns a head that is not
        in flight or moves used.idx further than the ring holds.
        """
        completed: list[tuple[int, int]] = []
        while True:
            used_idx = self.used_idx
            pending = (used_idx - self.last_used_idx) & 0xFFFF
            if pending > self.size:
                raise ProtocolViolation(
                    f"used.idx {used_idx} is {pending} entries past {self.last_used_idx} "
                    f"on a ring of {self.size}"
                )
            for _ in range(pending):
                head, length = self.used_entry(self.last_used_idx % self.size)
                chain = self._outstanding.pop(head, None)
                if chain is None:
                    raise ProtocolViolation(f"used entry for head {head}, which is not in flight")
                self._free.extend(chain.descriptors)
                if chain.indirect_table is not None:
                    self.ram.free(chain.indirect_table)
                self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
                completed.append((head, length))
            if not self.event_idx:
                return completed
            # Ask for an interrupt on the next entry, then look again: an entry
            # written before the device could see the new used_event sends none.
            self.used_event = self.last_used_idx
            if self.used_idx == used_idx:
                return completed
