"""Parsing a descriptor chain into a checked virtio-blk request.

Everything the guest controls in a request is checked here (header size,
data direction, status byte, sector range, lengths, segment counts), so the
device only executes typed, in-range requests. Each failure is a
``BlkRequestError`` carrying the status byte to answer with; a chain with no
writable byte for the status cannot be answered at all (``MissingStatus``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ...memory.guest_memory import views_after
from ...virtqueue.chain import DescriptorChain
from ..base import DeviceError
from .constants import SECTOR_SHIFT, SECTOR_SIZE, BlkRequestType, BlkStatus

HEADER: Final = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
SEGMENT: Final = struct.Struct("<QII")  # sector, num_sectors, flags
U64_LIMIT: Final = 1 << 64


class BlkRequestError(DeviceError):
    """A request that is refused with a status byte."""

    status: BlkStatus = BlkStatus.IOERR

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unsupported(BlkRequestError):
    status = BlkStatus.UNSUPP


class MissingStatus(DeviceError):
    """No device-writable byte to put the status in: the request cannot be answered."""


@dataclass(frozen=True, slots=True)
class DiscardSegment:
    sector: int
    num_sectors: int
    flags: int


@dataclass(slots=True)
class BlkRequest:
    """A parsed request. ``data_in``/``data_out`` are views of guest memory."""

    type: BlkRequestType
    sector: int
    status: memoryview
    data_out: list[memoryview]  # device reads (OUT, segments)
    data_in: list[memoryview]  # device writes (IN, GET_ID), status byte excluded
    data_len: int
    segments: tuple[DiscardSegment, ...] = ()

    @property
    def offset_bytes(self) -> int:
        return self.sector << SECTOR_SHIFT


def _split_status(chain: DescriptorChain) -> tuple[list[memoryview], memoryview]:
    """Separate the last writable byte (the status) from the writable data."""
    if chain.writable_len == 0:
        raise MissingStatus(f"chain at head {chain.head} has no writable status byte")
    views = list(chain.writable)
    last = views.pop()
    status = last[len(last) - 1 :]
    if len(last) > 1:
        views.append(last[: len(last) - 1])
    return views, status


def _gather(views: list[memoryview], length: int) -> bytes:
    out = bytearray()
    for view in views:
        need = length - len(out)
        if need <= 0:
            break
        out += view[:need]
    return bytes(out)


@dataclass(frozen=True, slots=True)
class BlkLimits:
    capacity_sectors: int
    read_only: bool
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    discard: bool
    write_zeroes: bool


# A dict lookup: calling the enum on every request costs more than the lookup.
_REQUEST_TYPES: Final = {t.value: t for t in BlkRequestType}


def _check_range(kind: BlkRequestType, sector: int, nbytes: int, limits: BlkLimits) -> None:
    if nbytes % SECTOR_SIZE:
        raise BlkRequestError(f"{kind.name} length {nbytes} is not a multiple of 512")
    end = sector + (nbytes >> SECTOR_SHIFT)
    if end > limits.capacity_sectors or sector >= U64_LIMIT >> SECTOR_SHIFT:
        raise BlkRequestError(
            f"{kind.name} sectors {sector}+{nbytes >> SECTOR_SHIFT} "
            f"pass the capacity of {limits.capacity_sectors}"
        )


def parse_request(chain: DescriptorChain, limits: BlkLimits) -> BlkRequest:
    """Check a chain as a virtio-blk request. Raises ``BlkRequestError``/``MissingStatus``."""
    data_in, status = _split_status(chain)
    readable = chain.readable
    if chain.readable_len < HEADER.size:
        raise BlkRequestError(f"request header is {chain.readable_len} bytes, needs 16")
    if len(readable[0]) >= HEADER.size:  # the header in one buffer: no gathering copy
        kind_code, _reserved, sector = HEADER.unpack_from(readable[0])
    else:
        kind_code, _reserved, sector = HEADER.unpack(_gather(readable, HEADER.size))
    out_len = chain.readable_len - HEADER.size
    in_len = chain.writable_len - 1
    kind = _REQUEST_TYPES.get(kind_code)
    if kind is None:
        raise Unsupported(f"request type {kind_code} is unknown")

    if kind is BlkRequestType.IN:
        if out_len:
            raise BlkRequestError(f"IN carries {out_len} device-readable data bytes")
        _check_range(kind, sector, in_len, limits)
        return BlkRequest(kind, sector, status, [], data_in, in_len)
    data_out = views_after(readable, HEADER.size) if out_len else []
    if kind is BlkRequestType.OUT:
        if limits.read_only:
            raise BlkRequestError("OUT on a read-only device")
        if in_len:
            raise BlkRequestError(f"OUT carries {in_len} device-writable data bytes")
        _check_range(kind, sector, out_len, limits)
        return BlkRequest(kind, sector, status, data_out, [], out_len)
    if kind == BlkRequestType.FLUSH:
        return BlkRequest(kind, sector, status, [], [], 0)
    if kind == BlkRequestType.GET_ID:
        if in_len == 0:
            raise BlkRequestError("GET_ID without a writable buffer")
        return BlkRequest(kind, sector, status, [], data_in, in_len)
    if kind in (BlkRequestType.DISCARD, BlkRequestType.WRITE_ZEROES):
        is_discard = kind == BlkRequestType.DISCARD
        if not (limits.discard if is_discard else limits.write_zeroes):
            raise Unsupported(f"{kind.name} was not offered")
        if limits.read_only:
            raise BlkRequestError(f"{kind.name} on a read-only device")
        if out_len == 0 or out_len % SEGMENT.size:
            raise BlkRequestError(f"{kind.name} payload of {out_len} bytes is not whole segments")
        count = out_len // SEGMENT.size
        max_seg = limits.max_discard_seg if is_discard else limits.max_write_zeroes_seg
        max_sectors = limits.max_discard_sectors if is_discard else limits.max_write_zeroes_sectors
        if count > max_seg:
            raise BlkRequestError(f"{kind.name} with {count} segments (max {max_seg})")
        raw = _gather(data_out, out_len)
        segments = []
        for i in range(count):
            seg = DiscardSegment(*SEGMENT.unpack_from(raw, i * SEGMENT.size))
            if seg.flags & ~1 or (is_discard and seg.flags):
                raise Unsupported(f"{kind.name} segment flags {seg.flags:#x}")
            if seg.num_sectors > max_sectors:
                raise BlkRequestError(
                    f"{kind.name} of {seg.num_sectors} sectors (max {max_sectors})"
                )
            if seg.sector + seg.num_sectors > limits.capacity_sectors:
                raise BlkRequestError(
                    f"{kind.name} sectors {seg.sector}+{seg.num_sectors} pass the capacity"
                )
            segments.append(seg)
        return BlkRequest(kind, sector, status, [], [], 0, tuple(segments))
    raise Unsupported(f"request type {kind.name} is not supported")
