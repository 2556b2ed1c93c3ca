"""Inflight I/O tracking for split rings (vhost-user.rst, "Inflight I/O tracking").

The back-end allocates a shared buffer (GET_INFLIGHT_FD); the front-end keeps
its fd and hands it back (SET_INFLIGHT_FD) to the next back-end after a crash.
In it, per queue, the back-end records which heads it took from the avail
ring and has not completed, so a restarted back-end resubmits exactly those,
in the order they were taken, whatever order completions had.

Per queue region (little endian)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];

Regions are 64-byte aligned. Only this back-end reads the layout (QEMU only
keeps the fd), so only its own invariants matter; the steps follow the spec.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from ..memory.peer_fd import PeerFdError, SealPolicy, map_peer_fd
from .errors import InvalidQueueConfig
from .inflight_packed import PackedInflightQueue, packed_queue_region_size

HEADER: Final = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE: Final = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
_U64: Final = struct.Struct("<Q")
_U16: Final = struct.Struct("<H")
VERSION: Final = 1
ALIGNMENT: Final = 64


def queue_region_size(queue_size: int) -> int:
    raw = HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class InflightQueue:
    """One queue's region. Owned by the queue's worker while the ring runs."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.u16 = view[: HEADER.size].cast("H")  # [4]=version [5]=desc_num [6]=batch [7]=used

    @property
    def initialized(self) -> bool:
        return self.u16[4] == VERSION

    def initialize(self) -> None:
        self.view[:] = bytes(len(self.view))
        HEADER.pack_into(self.view, 0, 0, VERSION, self.queue_size, 0, 0)

    def _desc_offset(self, head: int) -> int:
        return HEADER.size + DESC_STATE.size * head

    def mark_taken(self, head: int, counter: int) -> None:
        """A head popped from the avail ring: in flight, numbered in pop order."""
        offset = HEADER.size + DESC_STATE.size * head
        _U64.pack_into(self.view, offset + 8, counter)
        self.view[offset] = 1

    def mark_used_before_publish(self, head: int) -> None:
        """Before the used index moves: link the head into the last batch."""
        offset = HEADER.size + DESC_STATE.size * head
        _U16.pack_into(self.view, offset + 6, self.u16[6])
        self.u16[6] = head

    def mark_used_after_publish(self, head: int, used_idx: int) -> None:
        """After the used index moved: no longer in flight."""
        self.view[HEADER.size + DESC_STATE.size * head] = 0
        self.u16[7] = used_idx

    def in_flight_heads(self) -> list[int]:
        """Heads flagged in flight (before any recovery): what a crash left behind."""
        if not self.initialized:
            return []
        return [i for i in range(self.queue_size) if self.view[self._desc_offset(i)]]

    def recover(self, ring_used_idx: int) -> list[tuple[int, int]]:
        """After a restart: the heads still in flight, as (counter, head) in pop order.

        If the previous back-end died between moving the used index and clearing
        the inflight flags, the last batch (linked from last_batch_head) is
        finished here first, as the spec says.
        """
        if self.u16[5] != self.queue_size:
            raise InvalidQueueConfig(
                f"inflight region was made for queue size {self.u16[5]}, ring has {self.queue_size}"
            )
        batch = (ring_used_idx - self.u16[7]) & 0xFFFF
        head = self.u16[6]
        for _ in range(min(batch, self.queue_size)):
            offset = self._desc_offset(head)
            self.view[offset] = 0
            head = struct.unpack_from("<H", self.view, offset + 6)[0] % self.queue_size
        self.u16[7] = ring_used_idx
        pending = [
            (struct.unpack_from("<Q", self.view, self._desc_offset(head) + 8)[0], head)
            for head in self.in_flight_heads()
        ]
        pending.sort()
        return pending


class InflightRegion:
    """The whole shared buffer: ``num_queues`` regions, mapped from an fd.

    ``packed``: the regions have the packed layout (inflight_packed.py), which
    any queue size may use."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int, seal: SealPolicy = SealPolicy.TRY, *,
                 packed: bool = False) -> None:
        per_queue = (packed_queue_region_size if packed else queue_region_size)(queue_size)
        if num_queues == 0 or queue_size == 0 or (queue_size & (queue_size - 1) and not packed):
            raise InvalidQueueConfig(f"inflight for {num_queues} queues of size {queue_size}")
        if mmap_size < per_queue * num_queues:
            raise InvalidQueueConfig(
                f"inflight buffer of {mmap_size} bytes; {num_queues} queues of size "
                f"{queue_size} need {per_queue * num_queues}"
            )
        try:
            peer = map_peer_fd(fd, mmap_offset, mmap_size, "inflight buffer", seal)
        except PeerFdError as exc:
            raise InvalidQueueConfig(str(exc)) from None
        self._mapping = peer.mapping
        view = peer.view
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.mmap_size = mmap_size
        self.packed = packed
        queue_class = PackedInflightQueue if packed else InflightQueue
        self.queues: list = [
            queue_class(view[i * per_queue : (i + 1) * per_queue], queue_size)
            for i in range(num_queues)
        ]

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int, *,
                 packed: bool = False) -> tuple[InflightRegion, int]:
        """A new buffer in a memfd; returns the region and the fd to send. Packed
        regions stay zeroed (uninitialized) until their ring starts: they record
        the ring's used position, which only the start knows."""
        per_queue = (packed_queue_region_size if packed else queue_region_size)(queue_size)
        size = per_queue * num_queues
        # Sealable, so that mapping it seals it against shrinking (memory/peer_fd.py).
        fd = os.memfd_create("pyvhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            region = cls(fd, size, 0, num_queues, queue_size, packed=packed)
        except BaseException:
            os.close(fd)
            raise
        if not packed:
            for queue in region.queues:
                queue.initialize()
        return region, fd
