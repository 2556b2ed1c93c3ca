"""The virtio-blk driver side, on top of ``Frontend`` and one ring per queue
(``SplitRing``, or ``PackedRing`` when VIRTIO_F_RING_PACKED is negotiated).

A request is a chain: 16-byte header (``u32 type, u32 reserved, u64 sector``,
device-readable), data (device-writable for IN and GET_ID, readable
otherwise), and a 1-byte status (device-writable). Sectors are 512 bytes
whatever blk_size says. Completions are waited for on each queue's call
eventfd with poll(), never by sleeping.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple

from ..wire import VirtioFeature
from .client import DEFAULT_TIMEOUT, Frontend, QueueState
from .errors import FrontendError, FrontendTimeout, ProtocolViolation
from .guest_ram import GuestRam
from .iommu import Iommu, IommuMode
from .packed_ring import PackedRing
from .split_ring import Segment, SplitRing

SECTOR_SIZE: Final = 512

# Feature bits (virtio 1.x, 5.2.3).
VIRTIO_BLK_F_SIZE_MAX: Final = 1 << 1
VIRTIO_BLK_F_SEG_MAX: Final = 1 << 2
VIRTIO_BLK_F_GEOMETRY: Final = 1 << 4
VIRTIO_BLK_F_RO: Final = 1 << 5
VIRTIO_BLK_F_BLK_SIZE: Final = 1 << 6
VIRTIO_BLK_F_FLUSH: Final = 1 << 9
VIRTIO_BLK_F_TOPOLOGY: Final = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE: Final = 1 << 11
VIRTIO_BLK_F_MQ: Final = 1 << 12
VIRTIO_BLK_F_DISCARD: Final = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES: Final = 1 << 14

# What this driver accepts (like Linux's virtio_blk, minus packed rings and the IOMMU:
# BlkDriver(packed=True) adds packed rings).
BLK_DRIVER_FEATURES: Final = (
    VIRTIO_BLK_F_SIZE_MAX
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_GEOMETRY
    | VIRTIO_BLK_F_RO
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_TOPOLOGY
    | VIRTIO_BLK_F_CONFIG_WCE
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES
    | VirtioFeature.INDIRECT_DESC
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.VERSION_1
)

# Request types.
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13

# Status byte.
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2

VIRTIO_BLK_ID_BYTES: Final = 20
REQUEST_HEADER: Final = struct.Struct("<IIQ")
DISCARD_SEGMENT: Final = struct.Struct("<QII")  # sector, num_sectors, flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1
# The config space QEMU's vhost-user-blk asks for (struct virtio_blk_config up to
# write_zeroes_may_unmap and its padding); qemu-storage-daemon answers no more.
BLK_CONFIG_SIZE: Final = 60
DATA_ALIGN: Final = 64


class BlkStatusError(FrontendError):
    """A request completed with a status other than VIRTIO_BLK_S_OK."""

    def __init__(self, request: BlkRequest | None, status: int | None) -> None:
        kind = request.type if request else None
        super().__init__(f"virtio-blk request type {kind} completed with status {status}")
        self.request = request
        self.status = status


class BlkIOError(BlkStatusError):
    """VIRTIO_BLK_S_IOERR."""


class BlkUnsupported(BlkStatusError):
    """VIRTIO_BLK_S_UNSUPP."""


def status_error(request: BlkRequest | None, status: int | None) -> BlkStatusError:
    kinds: dict[int | None, type[BlkStatusError]] = {
        VIRTIO_BLK_S_IOERR: BlkIOError,
        VIRTIO_BLK_S_UNSUPP: BlkUnsupported,
    }
    return kinds.get(status, BlkStatusError)(request, status)


@dataclass(frozen=True)
class BlkConfig:
    """struct virtio_blk_config, as far as QEMU's vhost-user-blk reads it."""

    capacity: int  # in 512-byte sectors
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int
    # capacity, size_max, seg_max, geometry(H B B), blk_size, topology(B B H I),
    # writeback, unused0, num_queues, discard(3 I), write zeroes(2 I, B), unused1[3]
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")

    @classmethod
    def parse(cls, data: bytes) -> BlkConfig:
        if len(data) < cls.LAYOUT.size:
            data = data + bytes(cls.LAYOUT.size - len(data))
        return cls(*cls.LAYOUT.unpack_from(data))

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * SECTOR_SIZE


class Ticket(NamedTuple):
    """Names one submitted request: its queue and head descriptor."""

    queue: int
    head: int


@dataclass
class BlkRequest:
    """One virtio-blk request and where to put its buffers.

    ``segments``: split the data buffer over this many descriptors.
    ``straddle``: place the data buffer across a guest RAM region boundary.
    ``indirect``: put the chain in an indirect table.
    """

    type: int
    sector: int = 0
    data: bytes = b""  # device-readable payload (OUT, DISCARD, WRITE_ZEROES)
    read_length: int = 0  # device-writable payload (IN, GET_ID)
    queue: int = 0
    segments: int = 1
    straddle: bool = False
    indirect: bool = False

    @classmethod
    def read(cls, sector: int, nbytes: int, **placement: Any) -> BlkRequest:
        return cls(VIRTIO_BLK_T_IN, sector, read_length=nbytes, **placement)

    @classmethod
    def write(cls, sector: int, data: bytes, **placement: Any) -> BlkRequest:
        return cls(VIRTIO_BLK_T_OUT, sector, data=bytes(data), **placement)

    @classmethod
    def flush(cls, **placement: Any) -> BlkRequest:
        return cls(VIRTIO_BLK_T_FLUSH, **placement)

    @classmethod
    def get_id(cls, **placement: Any) -> BlkRequest:
        return cls(VIRTIO_BLK_T_GET_ID, read_length=VIRTIO_BLK_ID_BYTES, **placement)

    @classmethod
    def ranges(
        cls, kind: int, ranges: Iterable[tuple[int, int]], flags: int = 0, **placement: Any
    ) -> BlkRequest:
        """DISCARD or WRITE_ZEROES over ``[(sector, num_sectors), ...]``."""
        payload = b"".join(DISCARD_SEGMENT.pack(s, n, flags) for s, n in ranges)
        return cls(kind, data=payload, **placement)

    @property
    def writable_data(self) -> bool:
        return self.read_length > 0


@dataclass
class BlkCompletion:
    """What came back for one request (or raw chain)."""

    ticket: Ticket
    request: BlkRequest | None  # None for a raw chain
    status: int | None  # None when the chain had no status byte to read
    used_len: int
    data: bytes = b""
    writable_bytes: int = 0  # the most the device may report in used_len

    def check(self) -> BlkCompletion:
        """Raise unless the request succeeded and used_len is plausible."""
        if self.used_len > self.writable_bytes:
            raise ProtocolViolation(
                f"used.len {self.used_len} exceeds the {self.writable_bytes} writable bytes"
            )
        if self.status != VIRTIO_BLK_S_OK:
            raise status_error(self.request, self.status)
        return self


@dataclass
class _InFlight:
    request: BlkRequest | None
    allocations: list[int]  # gpas to free on completion
    data_gpa: int | None  # where the device-writable data lands
    data_length: int
    status_gpa: int | None
    writable_bytes: int


@dataclass
class _QueueWork:
    inflight: dict[int, _InFlight] = field(default_factory=dict)  # head -> request


class BlkDriver:
    """A virtio-blk driver over a vhost-user ``Frontend``.

    ``connect()`` does everything QEMU plus a guest driver do before the first
    I/O: handshake, GET_CONFIG, driver start with ``num_queues`` rings.
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        driver_features: int = BLK_DRIVER_FEATURES,
        io_timeout: float = 10.0,
        packed: bool = False,
    ) -> None:
        """``packed``: accept VIRTIO_F_RING_PACKED (used when the back-end offers it)."""
        self.frontend = frontend
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.driver_features = driver_features | (VirtioFeature.RING_PACKED if packed else 0)
        self.io_timeout = io_timeout
        self.config: BlkConfig | None = None
        self._work = [_QueueWork() for _ in range(num_queues)]
        self._done: dict[Ticket, BlkCompletion] = {}

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        ram: GuestRam | None = None,
        profile: str = "qemu-10.0",
        num_queues: int = 1,
        queue_size: int = 128,
        timeout: float = DEFAULT_TIMEOUT,
        memory_mode: str = "auto",
        driver_features: int = BLK_DRIVER_FEATURES,
        iommu: Iommu | IommuMode | None = None,
        extension: bool = False,
        persist: bool = False,
        premap: bool = False,
        prefetch_used: bool | None = None,
        packed: bool = False,
    ) -> BlkDriver:
        """Connect and start. ``iommu``: present IOVAs (ACCESS_PLATFORM acked, misses
        answered in the background); ``premap``: send the whole page table as UPDATEs
        at each start; ``extension``/``persist``: negotiate the vendor bits 48/49."""
        frontend = Frontend.connect(
            path, ram, timeout=timeout, profile=profile, memory_mode=memory_mode,
            iommu=iommu, extension=extension, persist=persist, premap=premap,
            prefetch_used=prefetch_used,
        )
        driver = cls(
            frontend,
            num_queues=num_queues,
            queue_size=queue_size,
            driver_features=driver_features,
            packed=packed,
        )
        try:
            driver.start()
        except BaseException:
            frontend.close()
            raise
        return driver

    def start(self) -> None:
        """Handshake (with the 60-byte GET_CONFIG), then the driver start."""
        self.frontend.handshake(num_queues=self.num_queues, config_size=BLK_CONFIG_SIZE)
        self.config = BlkConfig.parse(self.frontend.config)
        self.frontend.start_device([self.queue_size] * self.num_queues, self.driver_features)

    def close(self) -> None:
        self.frontend.close()

    def __enter__(self) -> BlkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ram(self) -> GuestRam:
        return self.frontend.ram

    @property
    def features(self) -> int:
        return self.frontend.acked_features

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: the rings are packed."""
        return bool(self.features & VirtioFeature.RING_PACKED)

    def ring(self, queue: int) -> SplitRing | PackedRing:
        ring = self.frontend.queue(queue).ring
        if ring is None:
            raise FrontendError(f"queue {queue} is not started")
        return ring

    def read_config(self) -> BlkConfig:
        """GET_CONFIG again, parsed."""
        self.config = BlkConfig.parse(self.frontend.get_config(0, BLK_CONFIG_SIZE))
        return self.config

    # -- synchronous helpers -------------------------------------------------
    def _one(self, request: BlkRequest, timeout: float | None) -> BlkCompletion:
        (ticket,) = self.submit([request])
        (completion,) = self.wait([ticket], timeout=timeout)
        return completion.check()

    def read(self, sector: int, nbytes: int, queue: int = 0, *,
             timeout: float | None = None, **placement: Any) -> bytes:
        return self._one(BlkRequest.read(sector, nbytes, queue=queue, **placement), timeout).data

    def write(self, sector: int, data: bytes, queue: int = 0, *,
              timeout: float | None = None, **placement: Any) -> None:
        self._one(BlkRequest.write(sector, data, queue=queue, **placement), timeout)

    def flush(self, queue: int = 0, *, timeout: float | None = None) -> None:
        self._one(BlkRequest.flush(queue=queue), timeout)

    def get_id(self, queue: int = 0, *, timeout: float | None = None) -> bytes:
        """The device id string (up to 20 bytes, NUL padding stripped)."""
        return self._one(BlkRequest.get_id(queue=queue), timeout).data.rstrip(b"\0")

    def discard(self, sector: int, nsectors: int, queue: int = 0, *,
                timeout: float | None = None) -> None:
        self._one(BlkRequest.ranges(VIRTIO_BLK_T_DISCARD, [(sector, nsectors)], queue=queue),
                  timeout)

    def write_zeroes(self, sector: int, nsectors: int, queue: int = 0, *, unmap: bool = False,
                     timeout: float | None = None) -> None:
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        self._one(BlkRequest.ranges(VIRTIO_BLK_T_WRITE_ZEROES, [(sector, nsectors)], flags,
                                    queue=queue), timeout)

    # -- asynchronous interface ----------------------------------------------
    def _place_data(self, request: BlkRequest, length: int) -> int:
        if request.straddle:
            return self.ram.alloc_straddling(length)
        return self.ram.alloc(length, DATA_ALIGN)

    def _build(self, request: BlkRequest) -> tuple[list[Segment], _InFlight]:
        header = self.ram.alloc(REQUEST_HEADER.size + 1, 16)  # header, then the status byte
        status_gpa = header + REQUEST_HEADER.size
        self.ram.write(header, REQUEST_HEADER.pack(request.type, 0, request.sector))
        self.ram.write(status_gpa, b"\xff")  # not a valid status: shows an unwritten byte
        allocations = [header]
        segments = [Segment(header, REQUEST_HEADER.size, False)]
        length = request.read_length or len(request.data)
        data_gpa = None
        if length:
            data_gpa = self._place_data(request, length)
            allocations.append(data_gpa)
            if request.data:
                self.ram.write(data_gpa, request.data)
            pieces = max(1, min(request.segments, length))
            cut = [length * i // pieces for i in range(pieces + 1)]
            segments += [
                Segment(data_gpa + start, end - start, request.writable_data)
                for start, end in zip(cut, cut[1:])
            ]
        segments.append(Segment(status_gpa, 1, True))
        writable = 1 + (request.read_length if request.writable_data else 0)
        work = _InFlight(request, allocations, data_gpa if request.writable_data else None,
                         request.read_length, status_gpa, writable)
        return segments, work

    def submit(self, requests: Iterable[BlkRequest]) -> list[Ticket]:
        """Queue requests on their rings, publish each ring once, kick where wanted."""
        tickets: list[Ticket] = []
        for request in requests:
            segments, work = self._build(request)
            try:
                head = self.ring(request.queue).add_chain(segments, indirect=request.indirect)
            except BaseException:
                for gpa in work.allocations:
                    self.ram.free(gpa)
                raise
            self._work[request.queue].inflight[head] = work
            tickets.append(Ticket(request.queue, head))
        self._publish({t.queue for t in tickets})
        return tickets

    def submit_chain(
        self,
        segments: Sequence[tuple[int, int, bool]],
        queue: int = 0,
        *,
        indirect: bool = False,
        status_gpa: int | None = None,
        translate: bool = True,
    ) -> Ticket:
        """Raw form: any chain of caller-owned buffers. The status byte read back is
        at ``status_gpa``, by default the last byte of the last buffer if it is writable.
        ``translate=False`` (IOMMU mode): the segment addresses are IOVAs already, and
        ``status_gpa`` must be given."""
        if status_gpa is None and translate and segments and segments[-1][2] and segments[-1][1]:
            status_gpa = segments[-1][0] + segments[-1][1] - 1
        head = self.ring(queue).add_chain(segments, indirect=indirect, translate=translate)
        writable = sum(length for _, length, w in segments if w)
        self._work[queue].inflight[head] = _InFlight(None, [], None, 0, status_gpa, writable)
        self._publish({queue})
        return Ticket(queue, head)

    def track_raw_head(self, queue: int, head: int, status_gpa: int | None = None) -> Ticket:
        """Expect a completion for a hand-written chain pushed with ``ring.push_avail``."""
        self._work[queue].inflight[head] = _InFlight(None, [], None, 0, status_gpa, 1 << 32)
        return Ticket(queue, head)

    def raw(
        self,
        segments: Sequence[tuple[int, int, bool]],
        queue: int = 0,
        *,
        indirect: bool = False,
        status_gpa: int | None = None,
        timeout: float | None = None,
        translate: bool = True,
    ) -> tuple[int, int | None]:
        """Submit a raw chain and wait: ``(used_len, status byte or None)``."""
        ticket = self.submit_chain(
            segments, queue, indirect=indirect, status_gpa=status_gpa, translate=translate
        )
        (completion,) = self.wait([ticket], timeout=timeout)
        return completion.used_len, completion.status

    def _publish(self, queues: Iterable[int]) -> None:
        for queue in sorted(queues):
            if self.ring(queue).publish():
                self.frontend.kick(queue)

    @property
    def in_flight(self) -> int:
        return sum(len(w.inflight) for w in self._work)

    def _reap(self, queue: int) -> None:
        work = self._work[queue]
        for head, used_len in self.ring(queue).pop_used():
            item = work.inflight.pop(head)
            data = b""
            if item.data_gpa is not None:
                data = self.ram.read(item.data_gpa, item.data_length)
            status = self.ram.read(item.status_gpa, 1)[0] if item.status_gpa is not None else None
            for gpa in item.allocations:
                self.ram.free(gpa)
            ticket = Ticket(queue, head)
            self._done[ticket] = BlkCompletion(
                ticket, item.request, status, used_len, data, item.writable_bytes
            )

    def _wait_for_calls(self, deadline: float) -> None:
        """Block on the call eventfds of busy queues until one fires or time runs out."""
        busy: list[QueueState] = [
            self.frontend.queue(q) for q, w in enumerate(self._work) if w.inflight
        ]
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not busy:
            raise FrontendTimeout(
                f"{self.in_flight} request(s) not completed in time "
                f"(or completed without a call notification)"
            )
        poller = select.poll()
        for queue in busy:
            poller.register(queue.call_fd, select.POLLIN)
        poller.poll(remaining * 1000)
        for queue in busy:
            queue.clear_call()

    def _completions(self, timeout: float | None) -> Iterator[None]:
        """Reap, yield to let the caller look, then sleep on the call fds; forever until timeout."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        while True:
            for queue, work in enumerate(self._work):
                if work.inflight:
                    self._reap(queue)
            yield
            self._wait_for_calls(deadline)

    def wait(
        self, tickets: Sequence[Ticket] | None = None, *, timeout: float | None = None
    ) -> list[BlkCompletion]:
        """Wait for ``tickets`` (default: everything in flight); completions in ticket order.

        Statuses are not checked here: call ``completion.check()``.
        """
        if tickets is None:
            tickets = [Ticket(q, h) for q, w in enumerate(self._work) for h in w.inflight]
            tickets += list(self._done)
        for _ in self._completions(timeout):
            if all(t in self._done for t in tickets):
                return [self._done.pop(t) for t in tickets]
        raise AssertionError("unreachable")

    def wait_any(self, *, timeout: float | None = None) -> list[BlkCompletion]:
        """Wait until at least one request completes; return every completion so far."""
        for _ in self._completions(timeout):
            if self._done:
                done = list(self._done.values())
                self._done.clear()
                return done
        raise AssertionError("unreachable")

    def run(self, requests: Iterable[BlkRequest], depth: int = 32, *,
            check: bool = True) -> list[BlkCompletion]:
        """Keep up to ``depth`` requests in flight per queue until all are done.

        Completions come back in the order of ``requests``.
        """
        pending = iter(enumerate(requests))
        lookahead = next(pending, None)
        order: dict[Ticket, int] = {}
        results: dict[int, BlkCompletion] = {}
        busy = [0] * self.num_queues
        while True:
            batch: list[tuple[int, BlkRequest]] = []
            while lookahead is not None and busy[lookahead[1].queue] < depth:
                batch.append(lookahead)
                busy[lookahead[1].queue] += 1
                lookahead = next(pending, None)
            for (position, _), ticket in zip(batch, self.submit(r for _, r in batch)):
                order[ticket] = position
            if not order:
                return [results[i] for i in range(len(results))]
            for completion in self.wait_any():
                position = order.pop(completion.ticket)
                busy[completion.ticket.queue] -= 1
                results[position] = completion.check() if check else completion

    def read_all(self, size: int | None = None, *, chunk: int = 128 << 10, depth: int = 32) -> bytes:
        """Read the first ``size`` bytes (default: the whole disk), spread over every queue."""
        if size is None:
            assert self.config is not None
            size = self.config.capacity_bytes
        requests = [
            BlkRequest.read(offset // SECTOR_SIZE, min(chunk, size - offset), queue=i % self.num_queues)
            for i, offset in enumerate(range(0, size, chunk))
        ]
        return b"".join(c.data for c in self.run(requests, depth))

    def reboot(self, before_start: Callable[[], None] | None = None) -> None:
        """A guest reboot: in-flight requests are forgotten, the device restarts
        (``before_start``: see ``Frontend.reboot``)."""
        for work in self._work:
            for item in work.inflight.values():
                for gpa in item.allocations:
                    self.ram.free(gpa)
            work.inflight.clear()
        self._done.clear()
        self.frontend.reboot(before_start)
