"""Split virtqueues: what the front-end configures, and the running ring.

``QueueConfig`` is what vhost-user messages change (size, addresses, base,
eventfds, enable); only the dispatcher touches it. ``SplitQueue.activate``
checks it against guest memory and yields the running ring that a queue
worker pops chains from and pushes completions to.

Ordering: the ring is shared with another CPU. On x86-64 (the only target
QEMU runs guests on here) stores are not reordered with other stores nor
loads with other loads, so writing the used element before the used index,
and reading the avail index before the ring entry, is enough.

Atomicity: every u16 the driver may touch concurrently (indices, flags,
event fields, ring entries) is read and written through ``memoryview.cast("H")``
views: one aligned 16-bit load or store each. ``struct.pack_into`` must not be
used for them: it zeroes the field, then writes it a byte at a time, so the
driver can read 0 or a torn index in between (seen with several queues busy).
The rings are little endian, as the host is.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from ..memory.address_space import AddressSpace
from ..memory.errors import GuestMemoryError
from ..memory.guest_memory import GuestMemory
from ..memory.iotlb import IotlbMiss
from .chain import DESC_SIZE, DescriptorChain, walk_chain
from .errors import InvalidQueueConfig, QueueCorrupted
from .inflight import InflightQueue

USED_ELEM: Final = struct.Struct("<II")
MAX_QUEUE_SIZE: Final = 32768
VRING_AVAIL_F_NO_INTERRUPT: Final = 1
EVENTFD_ONE: Final = (1).to_bytes(8, "little")


@dataclass(slots=True)
class QueueConfig:
    """Per-ring state set by the front-end's messages."""

    index: int
    size: int = 0
    desc_addr: int | None = None
    avail_addr: int | None = None
    used_addr: int | None = None
    log_guest_addr: int = 0
    log_used: bool = False
    base: int = 0  # next avail index to read (SET/GET_VRING_BASE)
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    broken: bool = False  # the driver broke the ring; nothing is served until restart

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    def replace_fd(self, name: str, fd: int | None) -> None:
        old = getattr(self, name)
        if old is not None and old != fd:
            try:
                os.close(old)
            except OSError:
                pass
        setattr(self, name, fd)

    @property
    def addresses_set(self) -> bool:
        return None not in (self.desc_addr, self.avail_addr, self.used_addr)


def check_ring_addresses(config: QueueConfig, areas: tuple[tuple[str, int], ...]) -> None:
    """The three ring addresses set, each aligned as its layout needs: ``areas``
    names and aligns the descriptor, driver (avail) and device (used) areas."""
    if not config.addresses_set:
        raise InvalidQueueConfig(f"queue {config.index}: ring addresses not set")
    for (name, align), addr in zip(areas, (config.desc_addr, config.avail_addr, config.used_addr)):
        assert addr is not None
        if addr % align:
            raise InvalidQueueConfig(f"queue {config.index}: {name} {addr:#x} misaligned")


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event in u16 arithmetic: did [old, new) pass ``event``?
    (A split ring's used_event; a packed ring's event offset.)"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitQueue:
    """A running split ring. Not thread-safe: one worker owns it."""

    def __init__(
        self,
        config: QueueConfig,
        rings: AddressSpace,
        buffers: AddressSpace,
        *,
        event_idx: bool,
        indirect: bool,
        eager: bool = True,
        inflight: InflightQueue | None = None,
    ) -> None:
        size = config.size
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise InvalidQueueConfig(f"queue {config.index}: size {size} is not a power of 2 <= 32768")
        check_ring_addresses(config, (("descriptor table", 16), ("avail ring", 2), ("used ring", 4)))
        self.index = config.index
        self.size = size
        self.buffers = buffers
        self.rings = rings
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc_addr, self._avail_addr, self._used_addr = (
            config.desc_addr, config.avail_addr, config.used_addr,
        )
        self.last_avail_idx = config.base & 0xFFFF
        self.used_idx = 0
        self.inflight = inflight
        self._inflight_counter = 1
        self.resubmit: deque[int] = deque()  # heads a dead back-end took and never completed
        self._ring_generation: int | None = None
        if eager:
            self.ensure_rings()

    def ensure_rings(self) -> None:
        """(Re)translate the ring addresses when their translation may have changed.

        Behind an IOTLB this is where a ring miss surfaces (``IotlbMiss``);
        an address that no translation can reach is ``InvalidQueueConfig``.
        """
        generation = self.rings.generation
        if generation == self._ring_generation:
            return
        size = self.size
        try:
            self.desc_table = self.rings.view(self._desc_addr, DESC_SIZE * size, write=False)
            self.avail = self.rings.view(self._avail_addr, 6 + 2 * size, write=False)
            self.used = self.rings.view(self._used_addr, 6 + 8 * size, write=True)
        except IotlbMiss:
            raise
        except GuestMemoryError as exc:
            raise InvalidQueueConfig(f"queue {self.index}: {exc}") from None
        self.avail16 = self.avail.cast("H")  # flags, idx, ring[size], used_event
        self.used16 = self.used.cast("H")  # flags, idx, {id, len}[size], avail_event
        if self._ring_generation is None:
            # The used index lives in guest memory: after a reconnect or migration
            # it is where the previous owner left it.
            self.used_idx = self.used16[1]
            self._signalled_used = self.used_idx
            self._signalled_valid = False
            if self.inflight is not None:
                self._recover_inflight()
        self._ring_generation = generation

    def _recover_inflight(self) -> None:
        assert self.inflight is not None
        if not self.inflight.initialized:
            self.inflight.initialize()
            return
        pending = self.inflight.recover(self.used_idx)
        if not pending:
            return
        # What the dead back-end took is exactly avail[used .. used + in flight]
        # (it popped in order); QEMU restarts the ring at the used index, so skip
        # those slots and serve the heads from the record, in the order taken.
        self.resubmit.extend(head for _counter, head in pending)
        self._inflight_counter = pending[-1][0] + 1
        self.last_avail_idx = (self.used_idx + len(pending)) & 0xFFFF

    @property
    def vring_base(self) -> int:
        """What GET_VRING_BASE answers: the next avail index to read."""
        return self.last_avail_idx

    # -- driver -> device ----------------------------------------------------
    def avail_idx(self) -> int:
        return self.avail16[1]

    def pending(self) -> int:
        """How many chains wait: resubmissions, then what the driver made available."""
        if self.resubmit:
            return len(self.resubmit)
        pending = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise QueueCorrupted(
                f"queue {self.index}: avail index moved {pending} ahead (queue size {self.size})"
            )
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises ``BadChain``/``QueueCorrupted``."""
        if self.resubmit:
            head = self.resubmit[0]
            chain = walk_chain(head, self.desc_table, self.size, self.buffers,
                               indirect_allowed=self.indirect)
            self.resubmit.popleft()
            return chain
        if not self.pending():
            return None
        slot = self.last_avail_idx % self.size
        head = self.avail16[2 + slot]
        if head >= self.size:
            raise QueueCorrupted(f"queue {self.index}: avail ring names head {head} >= {self.size}")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        try:
            chain = walk_chain(
                head,
                self.desc_table,
                self.size,
                self.buffers,
                indirect_allowed=self.indirect,
            )
            if self.inflight is not None:
                self.inflight.mark_taken(head, self._inflight_counter)
                self._inflight_counter += 1
            return chain
        except IotlbMiss:
            # Not consumed: the chain is walked again once the translation arrives
            # (or by whoever restarts the ring from the base we report).
            self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
            raise

    def enable_notifications(self) -> None:
        """Ask the driver to kick for anything after what we have popped (EVENT_IDX)."""
        if self.event_idx:
            self.used16[2 + 4 * self.size] = self.last_avail_idx

    # -- device -> driver ----------------------------------------------------
    def push_used(self, head: int, length: int) -> None:
        slot = self.used_idx % self.size
        if self.inflight is not None:
            self.inflight.mark_used_before_publish(head)
        USED_ELEM.pack_into(self.used, 4 + 8 * slot, head, length)  # published below
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used16[1] = self.used_idx
        if self.inflight is not None:
            self.inflight.mark_used_after_publish(head, self.used_idx)

    def needs_notification(self) -> bool:
        """Whether the driver asked to be interrupted for what was pushed since last time."""
        new = self.used_idx
        old = self._signalled_used
        self._signalled_used = new
        if not self.event_idx:
            flags = self.avail16[0]
            return not flags & VRING_AVAIL_F_NO_INTERRUPT
        if not self._signalled_valid:
            self._signalled_valid = True
            return True
        used_event = self.avail16[2 + self.size]
        return need_event(used_event, new, old)

    def used_ring_range(self) -> tuple[int, int]:
        """(offset, length) of the used ring in its address space, for dirty logging."""
        return 0, 6 + 8 * self.size

    def ring_log_ranges(self, log_guest_addr: int, memory: GuestMemory) -> list[tuple[int, int]]:
        """(gpa, length) of the ring memory the device writes, to mark in a dirty log.
        ``log_guest_addr`` is the used ring's guest physical address (SET_VRING_ADDR)."""
        return [(log_guest_addr, 6 + 8 * self.size)]


def signal_eventfd(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, EVENTFD_ONE)
    except BlockingIOError:
        pass  # counter saturated: the reader will wake anyway
    except OSError:
        pass  # the front-end closed it; nothing to tell
