"""Packed virtqueues (VIRTIO_F_RING_PACKED): the running ring, device side.

One descriptor ring serves both directions (virtio 1.1+, "Packed Virtqueues").
The driver makes a descriptor available by writing its flags with AVAIL equal
to its wrap counter and USED the inverse; the device marks a chain used by
writing one descriptor, at its own used position, with AVAIL = USED = its
wrap counter, the chain's buffer id (carried by the chain's last descriptor)
and the length written, then skips the chain's descriptor count. Both sides
read and write positions in order; completions may come in any order, so a
used descriptor can overwrite a chain that is still in flight (which is why
the in-flight chains are remembered here, and in the inflight region).

vhost-user, as QEMU 7.2 and 10.0 drive it:

* SET_VRING_ADDR: ``desc`` is the descriptor ring, ``avail`` the driver area
  (driver event suppression, read here), ``used`` the device area (device
  event suppression, written here).
* SET/GET_VRING_BASE: bits 0-14 the next position to read, bit 15 its wrap
  counter, bits 16-30 the used position, bit 31 the used wrap counter
  (virtio_queue_packed_get/set_last_avail_idx). QEMU has no packed used index
  in guest memory to fall back on: after a back-end crash it sends the base of
  the last orderly stop, which the inflight region overrides.

Atomicity and ordering as in split.py: every u16 the driver reads or writes
concurrently (flags, event fields) goes through ``memoryview.cast`` views, one
aligned 16-bit access each, and a used descriptor's flags are written last,
after its id and length (x86-64 keeps stores in order).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from ..memory.address_space import AddressSpace
from ..memory.dirty_log import buffer_address
from ..memory.errors import GuestMemoryError
from ..memory.guest_memory import GuestMemory
from ..memory.iotlb import IotlbMiss
from .chain import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    add_buffer,
    indirect_table_view,
)
from .errors import BadChain, InvalidQueueConfig, QueueCorrupted
from .inflight_packed import PackedInflightQueue, RecordedDescriptor
from .split import QueueConfig, check_ring_addresses, need_event

PACKED_DESC: Final = struct.Struct("<QIHH")  # addr, len, id, flags
VIRTQ_DESC_F_AVAIL: Final = 1 << 7
VIRTQ_DESC_F_USED: Final = 1 << 15
RING_EVENT_FLAGS_ENABLE: Final = 0
RING_EVENT_FLAGS_DISABLE: Final = 1
RING_EVENT_FLAGS_DESC: Final = 2
MAX_PACKED_QUEUE_SIZE: Final = 32768
EVENT_AREA_SIZE: Final = 4  # struct pvirtq_event_suppress: off_wrap, flags
WRAP_BIT: Final = 1 << 15


def encode_base(avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool) -> int:
    """The u32 of SET/GET_VRING_BASE for a packed ring."""
    return (avail_idx | avail_wrap << 15) | (used_idx | used_wrap << 15) << 16


def decode_base(base: int) -> tuple[int, bool, int, bool]:
    """(avail_idx, avail_wrap, used_idx, used_wrap) of a packed SET/GET_VRING_BASE value."""
    return base & 0x7FFF, bool(base & WRAP_BIT), (base >> 16) & 0x7FFF, bool(base >> 31 & 1)


def start_positions(base: int) -> tuple[int, bool, int, bool]:
    """Where a ring starts from a SET_VRING_BASE value: ``decode_base``, except
    that a value with only the avail half (bits 16-31 zero) starts the used
    position at the avail one.

    QEMU sends both halves (virtio_queue_packed_get_last_avail_idx). DPDK's
    virtio_user (22.11) sends only the avail half, ``0x8000`` for a fresh
    ring, and DPDK's own vhost back-end reads only that half and sets used =
    avail. Taken literally, 0x8000 says "used 0 with wrap 0", a whole lap
    behind avail: used descriptors would be written with the wrong wrap
    counter and the driver would never see one. After an orderly stop used
    and avail are equal (every chain is completed before GET_VRING_BASE is
    answered), and where both halves really are zero, used = avail is the
    same value; so reading an empty used half as "same as avail" is safe.
    """
    avail_idx, avail_wrap, used_idx, used_wrap = decode_base(base)
    if not base >> 16:
        used_idx, used_wrap = avail_idx, avail_wrap
    return avail_idx, avail_wrap, used_idx, used_wrap


def is_available(flags: int, wrap: bool) -> bool:
    """A driver descriptor made available in the lap whose wrap counter is ``wrap``."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == wrap and bool(flags & VIRTQ_DESC_F_USED) != wrap


class PackedQueue:
    """A running packed ring, with the interface ``QueueWorker`` uses for split rings.

    Not thread-safe: one worker owns it. ``pop`` returns chains whose ``head``
    is the buffer id, which is what ``push_used`` takes back.
    """

    def __init__(
        self,
        config: QueueConfig,
        rings: AddressSpace,
        buffers: AddressSpace,
        *,
        event_idx: bool,
        indirect: bool,
        eager: bool = True,
        inflight: PackedInflightQueue | None = None,
        recover_inflight: bool = False,
    ) -> None:
        size = config.size
        if not 0 < size <= MAX_PACKED_QUEUE_SIZE:
            raise InvalidQueueConfig(f"queue {config.index}: packed size {size} not in 1..32768")
        check_ring_addresses(config, (("descriptor ring", 16), ("driver area", 4), ("device area", 4)))
        avail_idx, avail_wrap, used_idx, used_wrap = start_positions(config.base)
        if avail_idx >= size or used_idx >= size or config.base >> 32:
            raise InvalidQueueConfig(
                f"queue {config.index}: packed base {config.base:#x} does not fit a ring of {size}")
        self.index = config.index
        self.size = size
        self.rings = rings
        self.buffers = buffers
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc_addr, self._driver_addr, self._device_addr = (
            config.desc_addr, config.avail_addr, config.used_addr,
        )
        self.avail_pos, self.avail_wrap = avail_idx, avail_wrap
        self.used_pos, self.used_wrap = used_idx, used_wrap
        self.inflight = inflight
        self._recover_inflight = recover_inflight
        self._inflight_counter = 1
        # buffer id -> (ring descriptors the chain took, its inflight head entry)
        self._in_flight: dict[int, tuple[int, int]] = {}
        # Chains a dead back-end fetched and never completed: (id, descriptors).
        self.resubmit: deque[tuple[int, list[RecordedDescriptor]]] = deque()
        self._ring_generation: int | None = None
        self._signalled_used = 0
        self._signalled_valid = False
        self._pushed_since_signal = 0  # descriptors made used since needs_notification
        if eager:
            self.ensure_rings()

    # -- set-up --------------------------------------------------------------
    def ensure_rings(self) -> None:
        """(Re)translate the ring addresses when their translation may have changed."""
        generation = self.rings.generation
        if generation == self._ring_generation:
            return
        try:
            self.desc_ring = self.rings.view(self._desc_addr, DESC_SIZE * self.size, write=True)
            self.driver_area = self.rings.view(self._driver_addr, EVENT_AREA_SIZE, write=False)
            self.device_area = self.rings.view(self._device_addr, EVENT_AREA_SIZE, write=True)
        except IotlbMiss:
            raise
        except GuestMemoryError as exc:
            raise InvalidQueueConfig(f"queue {self.index}: {exc}") from None
        self.desc16 = self.desc_ring.cast("H")  # 8 per descriptor: id at 6, flags at 7
        self.desc32 = self.desc_ring.cast("I")  # 4 per descriptor: len at 2
        self.driver16 = self.driver_area.cast("H")  # off_wrap, flags
        self.device16 = self.device_area.cast("H")
        if self._ring_generation is None and self.inflight is not None:
            self._start_inflight()
        self._ring_generation = generation

    def _start_inflight(self) -> None:
        assert self.inflight is not None
        if not (self._recover_inflight and self.inflight.initialized):
            self.inflight.initialize(self.used_pos, self.used_wrap)
            return
        # A previous back-end used this record: its used position is the truth
        # (the base QEMU sent is from its last orderly stop).
        used_idx, used_wrap = self.inflight.used_position
        published = False
        if used_idx < self.size:
            flags = self.desc16[8 * used_idx + 7]
            published = (bool(flags & VIRTQ_DESC_F_AVAIL) == used_wrap
                         and bool(flags & VIRTQ_DESC_F_USED) == used_wrap)
        chains = self.inflight.recover(published)
        self.used_pos, self.used_wrap = self.inflight.used_position
        if self.used_pos >= self.size:
            raise InvalidQueueConfig(
                f"queue {self.index}: inflight used index {self.used_pos} >= size {self.size}")
        fetched = 0
        for chain in chains:
            buffer_id = chain.descriptors[-1].id
            if buffer_id >= self.size or buffer_id in self._in_flight:
                raise QueueCorrupted(f"queue {self.index}: inflight record names buffer id "
                                     f"{buffer_id} (out of range or twice)")
            self._in_flight[buffer_id] = (len(chain.descriptors), chain.entry)
            self.resubmit.append((buffer_id, chain.descriptors))
            fetched += len(chain.descriptors)
        if chains:
            self._inflight_counter = chains[-1].counter + 1
        # What was fetched and not completed lies right after the used position.
        position = self.used_pos + fetched
        self.avail_pos, self.avail_wrap = position % self.size, self.used_wrap ^ (
            (position // self.size) & 1 == 1)

    @property
    def vring_base(self) -> int:
        """What GET_VRING_BASE answers: where to resume reading, and the used position."""
        return encode_base(self.avail_pos, self.avail_wrap, self.used_pos, self.used_wrap)

    @property
    def last_avail_idx(self) -> int:
        return self.avail_pos

    # -- driver -> device ----------------------------------------------------
    def _flags(self, position: int) -> int:
        return self.desc16[8 * position + 7]

    def pending(self) -> int:
        """Resubmissions, else 1 when the next descriptor is available, else 0."""
        if self.resubmit:
            return len(self.resubmit)
        return int(is_available(self._flags(self.avail_pos), self.avail_wrap))

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises ``BadChain``/``QueueCorrupted``."""
        if self.resubmit:
            buffer_id, recorded = self.resubmit[0]
            chain = DescriptorChain(buffer_id)
            self._walk(chain, recorded)
            self.resubmit.popleft()
            return chain
        position, wrap = self.avail_pos, self.avail_wrap
        if not is_available(self._flags(position), wrap):
            return None
        descriptors: list[RecordedDescriptor] = []
        while True:
            if len(descriptors) == self.size:
                raise BadChain(position, "chain longer than the ring (NEXT on every descriptor)")
            flags = self._flags(position)
            if descriptors and not is_available(flags, wrap):
                raise BadChain(self.avail_pos, "chain runs into a descriptor that is not "
                               "available (NEXT on the last one made available)")
            addr, length, buffer_id, _ = PACKED_DESC.unpack_from(self.desc_ring, 16 * position)
            descriptors.append(RecordedDescriptor(addr, length, buffer_id, flags))
            position += 1
            if position == self.size:
                position, wrap = 0, not wrap
            if not flags & VIRTQ_DESC_F_NEXT:
                break
        buffer_id = descriptors[-1].id
        if buffer_id >= self.size:
            raise BadChain(buffer_id, f"buffer id {buffer_id} >= queue size {self.size}")
        if buffer_id in self._in_flight:
            raise QueueCorrupted(f"queue {self.index}: buffer id {buffer_id} made available "
                                 "again while in flight")
        chain = DescriptorChain(buffer_id)
        self._walk(chain, descriptors)  # an IotlbMiss leaves the chain unconsumed
        entry = 0
        if self.inflight is not None:
            entry = self.inflight.record_chain(descriptors, self._inflight_counter)
            self._inflight_counter += 1
        self._in_flight[buffer_id] = (len(descriptors), entry)
        self.avail_pos, self.avail_wrap = position, wrap
        return chain

    def _walk(self, chain: DescriptorChain, descriptors: list[RecordedDescriptor]) -> None:
        """Turn the chain's ring descriptors into views (through an indirect table)."""
        for number, d in enumerate(descriptors):
            if d.flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise BadChain(chain.head, "indirect descriptor without INDIRECT_DESC negotiated")
                if len(descriptors) > 1:
                    raise BadChain(chain.head, "indirect descriptor chained with NEXT")
                if d.length == 0 or d.length % DESC_SIZE:
                    raise BadChain(chain.head, f"indirect table length {d.length} is not a multiple of 16")
                table = indirect_table_view(chain, self.buffers, d.addr, d.length)
                for i in range(d.length // DESC_SIZE):
                    addr, length, _id, flags = PACKED_DESC.unpack_from(table, DESC_SIZE * i)
                    if flags & VIRTQ_DESC_F_INDIRECT:
                        raise BadChain(chain.head, "indirect descriptor inside an indirect table")
                    add_buffer(chain, self.buffers, addr, length, bool(flags & VIRTQ_DESC_F_WRITE),
                               "indirect descriptor {}", i)
                return
            add_buffer(chain, self.buffers, d.addr, d.length, bool(d.flags & VIRTQ_DESC_F_WRITE),
                       "descriptor {} of the chain", number)

    def enable_notifications(self) -> None:
        """With EVENT_IDX: ask for a kick when the next unread descriptor becomes available.
        Without it the device area stays at ENABLE (zero), so the driver always kicks."""
        if self.event_idx:
            self.device16[0] = self.avail_pos | self.avail_wrap << 15
            self.device16[1] = RING_EVENT_FLAGS_DESC  # after off_wrap: the driver reads flags first

    # -- device -> driver ----------------------------------------------------
    def push_used(self, buffer_id: int, length: int) -> None:
        count, entry = self._in_flight.pop(buffer_id)
        position, wrap = self.used_pos, self.used_wrap
        following = position + count
        self.used_pos = following % self.size
        self.used_wrap = wrap ^ ((following // self.size) & 1 == 1)
        if self.inflight is not None:
            self.inflight.release_before_publish(entry, self.used_pos, self.used_wrap)
        self.desc16[8 * position + 6] = buffer_id
        self.desc32[4 * position + 2] = length
        flags = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) if wrap else 0
        if length:
            flags |= VIRTQ_DESC_F_WRITE  # "data has been written": len is valid
        self.desc16[8 * position + 7] = flags  # publishes the descriptor: last
        self._pushed_since_signal += count
        if self.inflight is not None:
            self.inflight.release_after_publish(entry)

    def needs_notification(self) -> bool:
        """Whether the driver asked (driver area) to be interrupted for what was pushed."""
        new = self.used_pos
        old = self._signalled_used
        self._signalled_used = new
        # Positions are taken modulo the ring size: a lap or more of used
        # descriptors since the last check (a driver that reaps while the device
        # serves can get there) leaves [old, new) ambiguous, and the driver's
        # event may lie in the lap it hides. Then signal.
        valid = self._signalled_valid and self._pushed_since_signal < self.size
        self._signalled_valid = True
        self._pushed_since_signal = 0
        flags = self.driver16[1] & 0x3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or not valid:
            return True
        off_wrap = self.driver16[0]
        event = off_wrap & 0x7FFF
        if new <= old:  # the used position wrapped since the last signal
            old -= self.size
        if bool(off_wrap & WRAP_BIT) != self.used_wrap:
            event -= self.size
        return need_event(event, new, old)

    def used_ring_range(self) -> tuple[int, int]:
        """(offset, length) the device writes in the descriptor ring, for dirty logging."""
        return 0, DESC_SIZE * self.size

    def ring_log_ranges(self, log_guest_addr: int, memory: GuestMemory) -> list[tuple[int, int]]:
        """(gpa, length) of the ring memory the device writes, to mark in a dirty log:
        the device area (``log_guest_addr``, as QEMU sends it) and the descriptor
        ring, where used descriptors go."""
        ranges = [(log_guest_addr, EVENT_AREA_SIZE)]
        gpa = memory.gpa_of_host_address(buffer_address(self.desc_ring))
        if gpa is not None:
            ranges.append((gpa, DESC_SIZE * self.size))
        return ranges
