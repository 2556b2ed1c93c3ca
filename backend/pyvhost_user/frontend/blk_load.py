"""A load generator for virtio-blk back-ends: chains built once, only sectors change.

``BlkDriver`` builds, allocates and copies per request, which is what a test
wants (every request its own buffers, data handed back as bytes) and what a
benchmark cannot afford: in Python that costs more than a back-end spends
serving the request, so the figures would measure the front-end. Here each
queue gets ``depth`` slots, each a three-descriptor chain (header, data,
status) written once; keeping a slot busy costs the front-end one header
store, one avail entry and, per batch, one avail index store and maybe a kick.

The data is checked, not just counted. Every 4 KiB block of the image starts
with its own block number (``stamp_image``); a completed read must carry the
stamp of the block it asked for, a write stamps the blocks it writes, and
every request must come back with status OK and the used length the spec
gives (data + status for a read, status only for a write).
"""

from __future__ import annotations

import os
import random
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .blk import REQUEST_HEADER, SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkDriver
from .errors import FrontendTimeout, ProtocolViolation
from .split_ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

STAMP_BLOCK: Final = 4096
STAMP: Final = struct.Struct("<Q")
_SECTOR: Final = struct.Struct("<Q")
SECTORS_PER_STAMP: Final = STAMP_BLOCK // SECTOR_SIZE


class DataMismatch(ProtocolViolation):
    """A read brought back another block's data: the back-end moved data wrongly."""


def stamp_image(path: str | os.PathLike[str], size: int, *, chunk: int = 1 << 20) -> None:
    """Write an image of ``size`` bytes whose every 4 KiB block starts with its number."""
    if size % STAMP_BLOCK or chunk % STAMP_BLOCK:
        raise ValueError("image size and chunk must be whole 4 KiB blocks")
    filler = os.urandom(chunk)  # the rest of each block: not compressible, not zero
    with open(path, "wb") as f:
        for start in range(0, size, chunk):
            buf = bytearray(filler[: min(chunk, size - start)])
            first = start // STAMP_BLOCK
            for i in range(len(buf) // STAMP_BLOCK):
                STAMP.pack_into(buf, i * STAMP_BLOCK, first + i)
            f.write(buf)


@dataclass(frozen=True)
class Pattern:
    """What each request does: ``block`` bytes (a multiple of 4 KiB), read or
    write, sequential (wrapping at the end) or uniformly random."""

    block: int
    write: bool
    sequential: bool

    def __post_init__(self) -> None:
        if self.block % STAMP_BLOCK or self.block <= 0:
            raise ValueError(f"block {self.block} is not a positive multiple of 4096")


@dataclass
class LoadResult:
    ios: int = 0
    bytes: int = 0
    seconds: float = 0.0
    frontend_cpu_seconds: float = 0.0
    kicks: int = 0
    wakeups: int = 0  # call notifications the front-end woke up for
    per_queue: list[int] = field(default_factory=list)

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mib_per_second(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds else 0.0


class _QueueSlots:
    """The fixed chains of one queue and the driver-side indices that drive them."""

    def __init__(self, driver: BlkDriver, queue: int, depth: int, pattern: Pattern) -> None:
        ring = driver.ring(queue)
        if ring.in_flight:
            raise ValueError(f"queue {queue} has requests in flight")
        if 3 * depth > ring.size:
            raise ValueError(f"depth {depth} needs {3 * depth} descriptors; queue {queue} has {ring.size}")
        self.queue = queue
        self.ring = ring
        self.ram = driver.ram
        self.state = driver.frontend.queue(queue)
        self.pattern = pattern
        self.size = ring.size
        self.event_idx = ring.event_idx
        ids = ring.take_descriptors(3 * depth)
        self.heads: dict[int, int] = {}  # head descriptor -> slot
        self.headers: list[memoryview] = []
        self.data: list[memoryview] = []
        self.statuses: list[memoryview] = []
        self.blocks: list[int] = [0] * depth  # the stamp block each slot's request is at
        self._allocations: list[int] = []
        kind = VIRTIO_BLK_T_OUT if pattern.write else VIRTIO_BLK_T_IN
        data_flags = VIRTQ_DESC_F_NEXT | (0 if pattern.write else VIRTQ_DESC_F_WRITE)
        for slot in range(depth):
            header = self._alloc(REQUEST_HEADER.size + 1, 16)
            data = self._alloc(pattern.block, 4096)
            h, d, s = ids[3 * slot : 3 * slot + 3]
            ring.write_descriptor(h, self._dma(header, REQUEST_HEADER.size), REQUEST_HEADER.size,
                                  VIRTQ_DESC_F_NEXT, d)
            ring.write_descriptor(d, self._dma(data, pattern.block), pattern.block, data_flags, s)
            ring.write_descriptor(s, self._dma(header + REQUEST_HEADER.size, 1), 1,
                                  VIRTQ_DESC_F_WRITE, 0)
            self.ram.write(header, REQUEST_HEADER.pack(kind, 0, 0))
            self.heads[h] = slot
            self.headers.append(self.ram.view(header, REQUEST_HEADER.size))
            self.statuses.append(self.ram.view(header + REQUEST_HEADER.size, 1))
            self.data.append(self.ram.view(data, pattern.block))
        self._ids = ids
        self.in_flight = 0

    def _dma(self, gpa: int, length: int) -> int:
        """The address the device sees: the gpa, or its IOVA behind an IOMMU (one run:
        each buffer is one descriptor)."""
        if self.ring.iommu is None:
            return gpa
        runs = self.ring.dma_segments([(gpa, length, False)])
        if len(runs) != 1:
            raise ValueError(f"buffer at gpa {gpa:#x} is {len(runs)} IOVA runs; the load "
                             "generator needs one per buffer (e.g. a LinearIommu)")
        return runs[0][0]

    def _alloc(self, size: int, align: int) -> int:
        gpa = self.ram.alloc(size, align)
        self._allocations.append(gpa)
        return gpa

    def queue_request(self, head: int, block: int) -> None:
        """Point the slot of ``head`` at stamp block ``block`` and put it in the avail ring."""
        slot = self.heads[head]
        self.blocks[slot] = block
        _SECTOR.pack_into(self.headers[slot], 8, block * SECTORS_PER_STAMP)
        self.statuses[slot][0] = 0xFF  # not a status: a request answered without one shows
        if self.pattern.write:
            data = self.data[slot]
            for i in range(self.pattern.block // STAMP_BLOCK):
                STAMP.pack_into(data, i * STAMP_BLOCK, block + i)
        ring = self.ring
        ring.set_avail_entry(ring.shadow_avail_idx % self.size, head)
        ring.shadow_avail_idx = (ring.shadow_avail_idx + 1) & 0xFFFF
        self.in_flight += 1

    def harvest(self) -> list[int]:
        """Check and consume new used entries; return their heads (free to reuse)."""
        ring = self.ring
        done: list[int] = []
        expected_len = 1 if self.pattern.write else self.pattern.block + 1
        while True:
            used_idx = ring.used_idx
            pending = (used_idx - ring.last_used_idx) & 0xFFFF
            if pending > self.in_flight:
                raise ProtocolViolation(
                    f"queue {self.queue}: used.idx {used_idx} is {pending} past "
                    f"{ring.last_used_idx} with {self.in_flight} in flight"
                )
            for _ in range(pending):
                head, length = ring.used_entry(ring.last_used_idx % self.size)
                slot = self.heads.get(head)
                if slot is None:
                    raise ProtocolViolation(f"queue {self.queue}: used entry for head {head}, not a request head")
                status = self.statuses[slot][0]
                if status != VIRTIO_BLK_S_OK:
                    raise ProtocolViolation(
                        f"queue {self.queue}: request at block {self.blocks[slot]} completed with status {status:#x}"
                    )
                if length != expected_len:
                    raise ProtocolViolation(
                        f"queue {self.queue}: used length {length} for a request of {expected_len}"
                    )
                if not self.pattern.write:
                    got = STAMP.unpack_from(self.data[slot])[0]
                    if got != self.blocks[slot]:
                        raise DataMismatch(
                            f"queue {self.queue}: read of block {self.blocks[slot]} returned block {got}'s data"
                        )
                ring.last_used_idx = (ring.last_used_idx + 1) & 0xFFFF
                done.append(head)
            self.in_flight -= pending
            if not self.event_idx:
                return done
            # Ask for an interrupt at the next entry, then look again: an entry
            # written before the device saw the new used_event sends none.
            ring.used_event = ring.last_used_idx
            if ring.used_idx == used_idx:
                return done

    def publish(self) -> bool:
        """Move avail.idx; True if the device wants a kick."""
        return self.ring.publish()

    def release(self) -> None:
        """Give the chains and buffers back (only once nothing is in flight)."""
        for view in (*self.headers, *self.data, *self.statuses):
            view.release()
        for gpa in self._allocations:
            self.ram.free(gpa)
        self.ring.give_back_descriptors(self._ids)


class BlkLoad:
    """Keep ``depth`` requests of ``pattern`` in flight on each of ``queues``.

    ``run`` serves completions until ``seconds`` have passed (or ``ios``
    requests completed), then waits for what is still in flight, so the rings
    are idle and the driver usable afterwards. Sectors cover ``span`` bytes
    from 0: sequential requests are spread so that queues do not overlap.
    """

    def __init__(
        self,
        driver: BlkDriver,
        pattern: Pattern,
        *,
        depth: int,
        queues: int | None = None,
        span: int | None = None,
        seed: int = 7,
    ) -> None:
        assert driver.config is not None
        self.driver = driver
        self.pattern = pattern
        self.depth = depth
        self.nqueues = driver.num_queues if queues is None else queues
        capacity = driver.config.capacity_bytes
        self.span = min(span or capacity, capacity) // STAMP_BLOCK * STAMP_BLOCK
        self.blocks = (self.span - pattern.block) // STAMP_BLOCK + 1  # where a request may start
        if self.blocks <= 0:
            raise ValueError(f"a {pattern.block}-byte request does not fit in {self.span} bytes")
        self.rng = random.Random(seed)
        self.io_timeout = driver.io_timeout
        self._next_seq = [q * self.blocks // self.nqueues for q in range(self.nqueues)]

    def _next_block(self, queue: int) -> int:
        if self.pattern.sequential:
            block = self._next_seq[queue]
            step = self.pattern.block // STAMP_BLOCK
            nxt = block + step
            self._next_seq[queue] = nxt if nxt < self.blocks else 0
            return block
        return self.rng.randrange(self.blocks)

    def run(self, seconds: float | None = None, *, ios: int | None = None,
            progress: Callable[[LoadResult], None] | None = None) -> LoadResult:
        if seconds is None and ios is None:
            raise ValueError("give seconds, ios or both")
        slots = [_QueueSlots(self.driver, q, self.depth, self.pattern) for q in range(self.nqueues)]
        result = LoadResult(per_queue=[0] * self.nqueues)
        try:
            self._run(slots, result, seconds, ios, progress)
        finally:
            if all(s.in_flight == 0 for s in slots):
                for s in slots:
                    s.release()
        return result

    def _run(self, slots: list[_QueueSlots], result: LoadResult, seconds: float | None,
             ios: int | None, progress: Callable[[LoadResult], None] | None) -> None:
        frontend = self.driver.frontend
        by_fd = {s.state.call_fd: s for s in slots}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        cpu0 = time.process_time()
        start = time.perf_counter()
        stop_at = start + seconds if seconds is not None else float("inf")
        next_report = start + 1.0
        for s in slots:
            for head in list(s.heads):
                s.queue_request(head, self._next_block(s.queue))
            if s.publish():
                frontend.kick(s.queue)
                result.kicks += 1
        submitting = True
        block = self.pattern.block
        last_progress = time.monotonic()
        while any(s.in_flight for s in slots):
            ready = poller.poll(1000)
            now = time.perf_counter()
            if not ready:
                if time.monotonic() - last_progress > self.io_timeout:
                    raise FrontendTimeout(
                        f"{sum(s.in_flight for s in slots)} request(s) not completed in "
                        f"{self.io_timeout:.0f} s"
                    )
                continue
            result.wakeups += len(ready)
            for fd, _events in ready:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
            if submitting and (now >= stop_at or (ios is not None and result.ios >= ios)):
                submitting = False
            for s in slots:
                done = s.harvest()
                if not done:
                    continue
                last_progress = time.monotonic()
                result.ios += len(done)
                result.per_queue[s.queue] += len(done)
                if submitting:
                    for head in done:
                        s.queue_request(head, self._next_block(s.queue))
                    if s.publish():
                        frontend.kick(s.queue)
                        result.kicks += 1
            if progress is not None and now >= next_report:
                next_report = now + 1.0
                result.seconds = now - start
                result.bytes = result.ios * block
                progress(result)
        result.seconds = time.perf_counter() - start
        result.bytes = result.ios * block
        result.frontend_cpu_seconds = time.process_time() - cpu0


__all__ = ["BlkLoad", "DataMismatch", "LoadResult", "Pattern", "stamp_image"]
