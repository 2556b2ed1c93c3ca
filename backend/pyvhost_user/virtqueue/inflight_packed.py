"""Inflight I/O tracking for packed rings (vhost-user.rst, "Inflight I/O tracking").

Packed rings need more than the split layout: a used descriptor overwrites the
ring slot of whatever chain the driver made available there, so a chain in
flight may no longer be in the ring when a restarted back-end looks. The
region therefore keeps a copy of every descriptor the back-end fetched and has
not completed, in entries taken from a free list, and the device's used
position (index and wrap counter) that the front-end cannot tell us (QEMU
keeps no packed used index in guest memory; on reconnect it sends a stale base).

Per queue region (little endian, C layout)::

    u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
    u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter;
    u8 padding[7];                                            # 32 bytes with alignment
    struct { u8 inflight; u8 padding; u16 next; u16 last; u16 num; u64 counter;
             u16 id; u16 flags; u32 len; u64 addr; } desc[desc_num];   # 32 bytes each

The "old_*" fields are the state after the last completed publication; the
others move first, so a crash in between is detected and rolled forward or
back on reconnect, as the spec's steps say. Only this back-end reads the
layout (QEMU only keeps the fd).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from .errors import InvalidQueueConfig, QueueCorrupted

HEADER: Final = struct.Struct("<QHHHHHHBB7x")
HEADER_SIZE: Final = 32  # HEADER.size (29) padded to the u64 alignment of desc[]
ENTRY: Final = struct.Struct("<BxHHHQHHIQ")  # inflight, next, last, num, counter, id, flags, len, addr
ENTRY_SIZE: Final = ENTRY.size  # 32
VERSION: Final = 1
ALIGNMENT: Final = 64
# u16 slots of the header, through a "H" cast of its first 16 bytes... and bytes after.
_VERSION, _DESC_NUM, _FREE, _OLD_FREE, _USED, _OLD_USED = 4, 5, 6, 7, 8, 9
_USED_WRAP_BYTE, _OLD_USED_WRAP_BYTE = 20, 21


class RecordedDescriptor(NamedTuple):
    addr: int
    length: int
    id: int
    flags: int


class RecoveredChain(NamedTuple):
    counter: int
    entry: int  # the head entry, which names the chain in the region
    descriptors: list[RecordedDescriptor]


def packed_queue_region_size(queue_size: int) -> int:
    raw = HEADER_SIZE + ENTRY_SIZE * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class PackedInflightQueue:
    """One packed queue's region. Owned by the queue's worker while the ring runs."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.u16 = view[:HEADER_SIZE].cast("H")

    # -- header ------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.u16[_VERSION] == VERSION

    def initialize(self, used_idx: int, used_wrap: bool) -> None:
        """An empty record for a ring whose device position is (used_idx, used_wrap)."""
        self.view[:] = bytes(len(self.view))
        size = self.queue_size
        HEADER.pack_into(self.view, 0, 0, VERSION, size, 0, 0, used_idx, used_idx,
                         used_wrap, used_wrap)
        for i in range(size):
            struct.pack_into("<H", self.view, self._offset(i) + 2, i + 1)  # free list, ends at size

    @property
    def used_position(self) -> tuple[int, bool]:
        """(old_used_idx, old_used_wrap_counter): the last published used position."""
        return self.u16[_OLD_USED], bool(self.view[_OLD_USED_WRAP_BYTE])

    def _offset(self, entry: int) -> int:
        return HEADER_SIZE + ENTRY_SIZE * entry

    def _next(self, entry: int) -> int:
        return struct.unpack_from("<H", self.view, self._offset(entry) + 2)[0]

    # -- while the ring runs --------------------------------------------------------
    def record_chain(self, descriptors: list[RecordedDescriptor], counter: int) -> int:
        """A chain fetched from the ring: copy it into free entries; returns its head entry."""
        head = entry = self.u16[_FREE]
        for descriptor in descriptors:
            if entry >= self.queue_size:
                raise QueueCorrupted(
                    f"more than {self.queue_size} descriptors in flight on a ring of that size")
            offset = self._offset(entry)
            next_free = self._next(entry)
            struct.pack_into("<HHIQ", self.view, offset + 16, descriptor.id, descriptor.flags,
                             descriptor.length, descriptor.addr)
            last = entry
            entry = next_free
        self.u16[_FREE] = entry
        struct.pack_into("<HHQ", self.view, self._offset(head) + 4, last, len(descriptors), counter)
        self.view[self._offset(head)] = 1
        self.u16[_OLD_FREE] = entry
        return head

    def release_before_publish(self, head: int, used_idx: int, used_wrap: bool) -> None:
        """Before the used descriptor's flags are written: the chain's entries go
        back to the free list and the (new) used position is recorded."""
        offset = self._offset(head)
        last = struct.unpack_from("<H", self.view, offset + 4)[0]
        struct.pack_into("<H", self.view, self._offset(last) + 2, self.u16[_FREE])
        self.u16[_FREE] = head
        self.u16[_USED] = used_idx
        self.view[_USED_WRAP_BYTE] = used_wrap

    def release_after_publish(self, head: int) -> None:
        """After the flags were written: no longer in flight, and the new state is the old."""
        self.view[self._offset(head)] = 0
        self.u16[_OLD_FREE] = self.u16[_FREE]
        self.u16[_OLD_USED] = self.u16[_USED]
        self.view[_OLD_USED_WRAP_BYTE] = self.view[_USED_WRAP_BYTE]

    def in_flight_entries(self) -> list[int]:
        if not self.initialized:
            return []
        return [i for i in range(self.queue_size) if self.view[self._offset(i)]]

    # -- after a restart ------------------------------------------------------------
    def recover(self, published: bool) -> list[RecoveredChain]:
        """Finish or roll back an interrupted completion, then the chains still in
        flight in fetch order. ``published``: whether the ring shows the used
        descriptor at old_used_idx written with old_used_wrap_counter (the caller
        reads the ring); only consulted when the record says a completion was cut short.
        """
        size = self.queue_size
        if self.u16[_DESC_NUM] != size:
            raise InvalidQueueConfig(
                f"inflight region was made for queue size {self.u16[_DESC_NUM]}, ring has {size}")
        interrupted = (self.u16[_USED], self.view[_USED_WRAP_BYTE]) != (
            self.u16[_OLD_USED], self.view[_OLD_USED_WRAP_BYTE])
        if interrupted and published:
            self.u16[_OLD_FREE] = self.u16[_FREE]
            self.u16[_OLD_USED] = self.u16[_USED]
            self.view[_OLD_USED_WRAP_BYTE] = self.view[_USED_WRAP_BYTE]
        else:
            self.u16[_FREE] = self.u16[_OLD_FREE]
            self.u16[_USED] = self.u16[_OLD_USED]
            self.view[_USED_WRAP_BYTE] = self.view[_OLD_USED_WRAP_BYTE]
        # Whatever is on the free list is not in flight (a completion cut short
        # after its entries were freed left its head flagged).
        entry, seen = self.u16[_FREE], 0
        while entry < size and seen <= size:
            self.view[self._offset(entry)] = 0
            entry, seen = self._next(entry), seen + 1
        if seen > size:
            raise QueueCorrupted("inflight record: the free list loops")
        chains = []
        for head in self.in_flight_entries():
            _inflight, _next, _last, num, counter = struct.unpack_from(
                "<BxHHHQ", self.view, self._offset(head))
            if not 0 < num <= size:
                raise QueueCorrupted(f"inflight record: entry {head} holds {num} descriptors")
            descriptors, entry = [], head
            for _ in range(num):
                if entry >= size:
                    raise QueueCorrupted(f"inflight record: chain at entry {head} runs off")
                id_, flags, length, addr = struct.unpack_from(
                    "<HHIQ", self.view, self._offset(entry) + 16)
                descriptors.append(RecordedDescriptor(addr, length, id_, flags))
                entry = self._next(entry)
            chains.append(RecoveredChain(counter, head, descriptors))
        chains.sort()
        return chains
