"""The driver side of a packed virtqueue (VIRTIO_F_RING_PACKED), laid out in ``GuestRam``.

Layout (virtio 1.1+, "Packed Virtqueues"): a descriptor ring of ``size``
16-byte descriptors ``{u64 addr, u32 len, u16 id, u16 flags}`` (16-aligned),
the driver event suppression area (4 bytes, written here) and the device event
suppression area (4 bytes, read here), each ``{u16 off_wrap, u16 flags}``.
Any size from 1 to 32768 is allowed.

The driver writes a chain's descriptors in ring order, the buffer id in each
(the spec needs it in the last one), and the head's flags last: that store
makes the whole chain available (``publish``). The device answers with one
used descriptor per chain, in completion order, at its own used position,
then skips the chain's length; ``pop_used`` follows it the same way.

Same ordering rules as split_ring.py: each step is a separate store through
the shared mapping, in program order, and u16 fields the device touches
concurrently go through ``memoryview.cast("H")``.

The ring offers the interface ``BlkDriver`` and ``Frontend`` use on
``SplitRing``; the "head" of a chain is its buffer id.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from .errors import ProtocolViolation, RingError
from .guest_ram import GuestRam
from .split_ring import RingDma, vring_need_event

if TYPE_CHECKING:
    from .iommu import Iommu

PACKED_DESC: Final = struct.Struct("<QIHH")  # addr, len, id, flags
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_DESC_F_AVAIL: Final = 1 << 7
VIRTQ_DESC_F_USED: Final = 1 << 15
RING_EVENT_FLAGS_ENABLE: Final = 0
RING_EVENT_FLAGS_DISABLE: Final = 1
RING_EVENT_FLAGS_DESC: Final = 2
MAX_PACKED_QUEUE_SIZE: Final = 32768
EVENT_AREA_SIZE: Final = 4


class PackedDescriptor(NamedTuple):
    addr: int
    length: int
    id: int
    flags: int


@dataclass
class _Buffer:
    descriptors: int  # ring descriptors the chain took (what the device skips)
    indirect_table: int | None  # gpa of the indirect table to free, if any


def packed_base(avail_pos: int, avail_wrap: bool, used_pos: int, used_wrap: bool) -> int:
    """The u32 QEMU sends with SET_VRING_BASE for a packed ring."""
    return (avail_pos | avail_wrap << 15) | (used_pos | used_wrap << 15) << 16


class PackedRing(RingDma):
    """Descriptor ring and event areas of one packed queue, driven from the driver side."""

    packed = True

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        start_index: int = 0,
        iommu: Iommu | None = None,
    ) -> None:
        if not 1 <= size <= MAX_PACKED_QUEUE_SIZE:
            raise RingError(f"packed ring size {size} is not in 1..32768")
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.iommu = iommu
        self._sizes = (16 * size, EVENT_AREA_SIZE, EVENT_AREA_SIZE)
        self.desc_gpa = self._alloc(self._sizes[0], 16)
        self.driver_gpa = self._alloc(EVENT_AREA_SIZE, 4)
        self.device_gpa = self._alloc(EVENT_AREA_SIZE, 4)
        self._desc = ram.view(self.desc_gpa, self._sizes[0])
        self._driver = ram.view(self.driver_gpa, EVENT_AREA_SIZE)
        self._device = ram.view(self.device_gpa, EVENT_AREA_SIZE)
        self._desc16 = self._desc.cast("H")
        self._driver16 = self._driver.cast("H")
        self._device16 = self._device.cast("H")
        self.reset(start_index)

    # -- lifetime ------------------------------------------------------------
    def reset(self, start_index: int = 0) -> None:
        """Zeroed ring, every id free, both wrap counters 1; ``start_index`` (< size)
        starts both positions there, to reach the end of the ring quickly."""
        for buffer in getattr(self, "_outstanding", {}).values():
            if buffer.indirect_table is not None:
                self.ram.free(buffer.indirect_table)
        for view in (self._desc, self._driver, self._device):
            view[:] = bytes(len(view))
        start = start_index % self.size
        self.next_avail, self.avail_wrap = start, True
        self.next_used, self.used_wrap = start, True
        self._free_ids: deque[int] = deque(range(self.size))
        self._free_descriptors = self.size
        self._outstanding: dict[int, _Buffer] = {}
        self._unpublished: list[tuple[int, int]] = []  # (position, head flags)
        self._published_avail = (self.next_avail, self.avail_wrap)

    def release(self) -> None:
        self.reset()
        for view in (self._desc16, self._driver16, self._device16, self._desc, self._driver,
                     self._device):
            view.release()
        for gpa in (self.desc_gpa, self.driver_gpa, self.device_gpa):
            self.ram.free(gpa)

    @property
    def start_base(self) -> int:
        """The SET_VRING_BASE value for (re)starting a quiet ring: both positions
        at the next descriptor to use (what QEMU sends after a clean stop)."""
        return packed_base(self.next_used, self.used_wrap, self.next_used, self.used_wrap)

    # -- addresses for SET_VRING_ADDR: desc ring, device area ("used"), driver area ("avail")
    @property
    def desc_user_addr(self) -> int:
        return self._ring_addr(self.desc_gpa, self._sizes[0])

    @property
    def avail_user_addr(self) -> int:
        return self._ring_addr(self.driver_gpa, EVENT_AREA_SIZE)

    @property
    def used_user_addr(self) -> int:
        return self._ring_addr(self.device_gpa, EVENT_AREA_SIZE)

    # -- raw field access (tests may corrupt anything) -----------------------
    def write_descriptor(self, position: int, addr: int, length: int, id_: int, flags: int) -> None:
        """All four fields; the flags with one 16-bit store, after the rest."""
        struct.pack_into("<QIH", self._desc, 16 * position, addr, length, id_)
        self._desc16[8 * position + 7] = flags

    def read_descriptor(self, position: int) -> PackedDescriptor:
        return PackedDescriptor(*PACKED_DESC.unpack_from(self._desc, 16 * position))

    def avail_flags(self, wrap: bool) -> int:
        """AVAIL and USED bits of a descriptor made available in a lap with ``wrap``."""
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote (when it wants kicks)."""
        return self._device16[0], self._device16[1]

    @property
    def driver_event(self) -> tuple[int, int]:
        return self._driver16[0], self._driver16[1]

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self._driver16[0] = off_wrap
        self._driver16[1] = flags

    # -- driver operations ---------------------------------------------------
    @property
    def free_descriptors(self) -> int:
        return self._free_descriptors

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def _advance(self) -> None:
        self.next_avail += 1
        if self.next_avail == self.size:
            self.next_avail, self.avail_wrap = 0, not self.avail_wrap

    def add_chain(
        self,
        segments: Sequence[tuple[int, int, bool]],
        indirect: bool = False,
        *,
        translate: bool = True,
    ) -> int:
        """Write a chain (not yet published); returns its buffer id."""
        if not segments:
            raise RingError("a chain needs at least one buffer")
        if translate:
            segments = self.dma_segments(segments)
        needed = 1 if indirect else len(segments)
        if needed > self._free_descriptors or not self._free_ids:
            raise RingError(f"{needed} descriptors wanted, {self._free_descriptors} free")
        buffer_id = self._free_ids.popleft()
        table: int | None = None
        if indirect:
            table = self._alloc(16 * len(segments), 16)
            entries = b"".join(
                PACKED_DESC.pack(addr, length, 0, VIRTQ_DESC_F_WRITE if writable else 0)
                for addr, length, writable in segments)
            self.ram.write(table, entries)
            table_addr = table
            if self.iommu is not None:
                table_addr = self.iommu.iova_contiguous(table, len(entries))
            descriptors = [(table_addr, len(entries), VIRTQ_DESC_F_INDIRECT)]
        else:
            descriptors = [
                (addr, length, (VIRTQ_DESC_F_WRITE if writable else 0)
                 | (VIRTQ_DESC_F_NEXT if i + 1 < len(segments) else 0))
                for i, (addr, length, writable) in enumerate(segments)
            ]
        head_position = self.next_avail
        head_flags = 0
        for i, (addr, length, flags) in enumerate(descriptors):
            flags |= self.avail_flags(self.avail_wrap)
            if i == 0:
                head_flags = flags
                # Everything but the flags now; the flags at publish().
                struct.pack_into("<QIH", self._desc, 16 * self.next_avail, addr, length, buffer_id)
            else:
                self.write_descriptor(self.next_avail, addr, length, buffer_id, flags)
            self._advance()
        self._unpublished.append((head_position, head_flags))
        self._free_descriptors -= len(descriptors)
        self._outstanding[buffer_id] = _Buffer(len(descriptors), table)
        return buffer_id

    def publish(self) -> bool:
        """Make the written chains available (head flags, in ring order); True if
        the device wants a kick."""
        for position, flags in self._unpublished:
            self._desc16[8 * position + 7] = flags
        added = len(self._unpublished)
        self._unpublished.clear()
        old_pos, old_wrap = self._published_avail
        self._published_avail = (self.next_avail, self.avail_wrap)
        if not added:
            return False
        off_wrap, flags = self._device16[0], self._device16[1]
        if flags != RING_EVENT_FLAGS_DESC:
            return flags != RING_EVENT_FLAGS_DISABLE
        # virtqueue_kick_prepare_packed: did [old, new) pass the device's event?
        new = self.next_avail
        old = old_pos if old_wrap == self.avail_wrap else old_pos - self.size
        event = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self.avail_wrap:
            event -= self.size
        return vring_need_event(event & 0xFFFF, new & 0xFFFF, old & 0xFFFF)

    def pop_used(self) -> list[tuple[int, int]]:
        """Consume used descriptors: ``[(buffer id, len), ...]``, descriptors recycled.

        Raises ``ProtocolViolation`` for an id that is not in flight.
        """
        completed: list[tuple[int, int]] = []
        while True:
            flags = self._desc16[8 * self.next_used + 7]
            wrap = self.used_wrap
            if bool(flags & VIRTQ_DESC_F_USED) == wrap and bool(flags & VIRTQ_DESC_F_AVAIL) == wrap:
                _addr, length, buffer_id, _flags = PACKED_DESC.unpack_from(
                    self._desc, 16 * self.next_used)
                buffer = self._outstanding.pop(buffer_id, None)
                if buffer is None:
                    raise ProtocolViolation(
                        f"used descriptor at {self.next_used} names buffer id {buffer_id}, "
                        "which is not in flight")
                if not flags & VIRTQ_DESC_F_WRITE:
                    length = 0  # len is reserved without WRITE
                self.next_used += buffer.descriptors
                if self.next_used >= self.size:
                    self.next_used -= self.size
                    self.used_wrap = not self.used_wrap
                self._free_descriptors += buffer.descriptors
                self._free_ids.append(buffer_id)
                if buffer.indirect_table is not None:
                    self.ram.free(buffer.indirect_table)
                completed.append((buffer_id, length))
                continue
            if not self.event_idx:
                return completed
            # Ask for an interrupt at the next used position, then look again.
            off_wrap = self.next_used | self.used_wrap << 15
            if self._driver16[0] != off_wrap or self._driver16[1] != RING_EVENT_FLAGS_DESC:
                self.set_driver_event(RING_EVENT_FLAGS_DESC, off_wrap)
                continue
            return completed
