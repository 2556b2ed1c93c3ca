"""The virtio-blk device: parse a chain, run it against the image, answer.

Only device logic lives here: no protocol, no rings. Each queue's worker
calls ``process`` from its own thread; the image calls release the GIL, so
several queues do I/O at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ...virtqueue.chain import DescriptorChain
from ..base import Device, DeviceError
from .config import BlkConfig
from .constants import ID_BYTES, SECTOR_SHIFT, WRITE_ZEROES_FLAG_UNMAP, BlkFeature, BlkRequestType, BlkStatus
from .image import Image
from .metrics import BlkMetrics
from .request import BlkLimits, BlkRequest, BlkRequestError, MissingStatus, parse_request

log = logging.getLogger(__name__)

# Limits we advertise. seg_max: a chain's data descriptors; QEMU caps guests at
# queue size - 2. The discard limits keep a single request's work bounded.
SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 1
_BLOCKING_TYPES = frozenset({BlkRequestType.FLUSH, BlkRequestType.DISCARD, BlkRequestType.WRITE_ZEROES})


class BlkDevice(Device):
    capability_type = "block"
    allows_worker_processes = True

    def __init__(
        self,
        image_path: str,
        *,
        read_only: bool = False,
        num_queues: int = 1,
        serial: str | None = None,
    ) -> None:
        if not 1 <= num_queues <= 64:
            raise DeviceError(f"--num-queues {num_queues} is not in 1..64")
        self.image = Image(image_path, read_only=read_only)
        if self.image.size_bytes % 512:
            log.warning(
                "image size %d is not a multiple of 512: the last %d bytes are not visible",
                self.image.size_bytes,
                self.image.size_bytes % 512,
            )
        self.read_only = read_only
        self._num_queues = num_queues
        self.capacity_sectors = self.image.size_bytes >> SECTOR_SHIFT
        self.serial = (serial or os.path.basename(image_path))[:ID_BYTES].encode()
        self.metrics = BlkMetrics()
        self.config = BlkConfig(
            capacity_sectors=self.capacity_sectors,
            seg_max=SEG_MAX,
            blk_size=512,
            num_queues=num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=8,  # 4 KiB: what hole punching works in
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG,
            write_zeroes_may_unmap=1,
        )
        self._config_bytes = self.config.encode()
        self.limits = BlkLimits(
            capacity_sectors=self.capacity_sectors,
            read_only=read_only,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG,
            discard=not read_only,
            write_zeroes=not read_only,
        )

    @property
    def num_queues(self) -> int:
        return self._num_queues

    @property
    def device_features(self) -> int:
        features = BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.MQ
        if self.read_only:
            features |= BlkFeature.RO
        else:
            features |= BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
        return int(features)

    def read_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self._config_bytes):
            # Front-ends ask for more than the struct (QEMU asks for its own
            # sizeof); what is past the end reads as zero.
            return (self._config_bytes + bytes(offset + size))[offset : offset + size]
        return self._config_bytes[offset : offset + size]

    def export_state(self) -> dict[str, Any]:
        # No volatile state: the config space is read-only (no CONFIG_WCE offered),
        # so only what the driver relies on travels, for the destination to compare.
        return {
            **super().export_state(),
            "capacity_sectors": self.capacity_sectors,
            "read_only": self.read_only,
            "num_queues": self.num_queues,
        }

    def describe(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return (
            f"virtio-blk {self.image.path} {self.image.size_bytes} bytes "
            f"({self.capacity_sectors} sectors) {mode}, {self.num_queues} queue(s)"
        )

    def start_private_counters(self) -> None:
        self.metrics = BlkMetrics()

    def private_counters(self) -> dict[str, int]:
        return self.metrics.snapshot()

    def add_counters(self, counts: Mapping[str, int]) -> None:
        self.metrics.add(**{name: int(value) for name, value in counts.items()
                            if name in BlkMetrics.counter_names()})

    def blocks(self, chain: DescriptorChain) -> bool:
        # The low byte of the request type, unparsed: flush, discard and write
        # zeroes wait for the disk (fdatasync, fallocate) whatever their size.
        readable = chain.readable
        return bool(readable) and len(readable[0]) > 0 and readable[0][0] in _BLOCKING_TYPES

    def process(self, queue_index: int, chain: DescriptorChain) -> int:
        if chain.access_denied is not None:
            # An IOMMU fault: the request fails and no data moves. The status
            # byte is answered when its own buffer is writable through the IOTLB.
            self.metrics.add(requests_access_denied=1)
            log.error("queue %d: request failed by the IOMMU: %s", queue_index, chain.access_denied)
            if chain.writable and not chain.last_writable_denied:
                _status_view(chain)[0] = BlkStatus.IOERR
                return 1
            return 0
        try:
            request = parse_request(chain, self.limits)
        except MissingStatus as exc:
            self.metrics.add(requests_unanswerable=1)
            log.error("queue %d: request refused: %s", queue_index, exc)
            return 0
        except BlkRequestError as exc:
            self.metrics.add(requests_refused=1)
            log.warning("queue %d: request refused (%s): %s", queue_index, exc.status.name, exc.reason)
            # the status byte is the last writable byte: find it again
            status = _status_view(chain)
            status[0] = exc.status
            return 1
        try:
            written = self._execute(request)
        except OSError as exc:
            self.metrics.add(io_errors=1)
            log.error(
                "queue %d: %s at sector %d failed on the image: %s",
                queue_index,
                request.type.name,
                request.sector,
                exc,
            )
            request.status[0] = BlkStatus.IOERR
            return 1
        request.status[0] = BlkStatus.OK
        return written + 1

    def _execute(self, request: BlkRequest) -> int:
        """Run a checked request; return the data bytes written to guest memory."""
        kind = request.type
        if kind is BlkRequestType.IN:
            self.image.read_into(request.data_in, request.offset_bytes)
            self.metrics.add_read(request.data_len)
            return request.data_len
        if kind is BlkRequestType.OUT:
            self.image.write_from(request.data_out, request.offset_bytes)
            self.metrics.add_write(request.data_len)
            return 0
        if kind == BlkRequestType.FLUSH:
            if not self.read_only:
                self.image.flush()
            self.metrics.add(flushes=1)
            return 0
        if kind == BlkRequestType.GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, request.data_len)]
            written = 0
            for view in request.data_in:
                piece = ident[written : written + len(view)]
                view[: len(piece)] = piece
                written += len(piece)
                if written == len(ident):
                    break
            self.metrics.add(get_ids=1)
            return written
        if kind == BlkRequestType.DISCARD:
            for seg in request.segments:
                self.image.discard(seg.sector << SECTOR_SHIFT, seg.num_sectors << SECTOR_SHIFT)
            self.metrics.add(discards=1)
            return 0
        if kind == BlkRequestType.WRITE_ZEROES:
            for seg in request.segments:
                self.image.write_zeroes(
                    seg.sector << SECTOR_SHIFT,
                    seg.num_sectors << SECTOR_SHIFT,
                    unmap=bool(seg.flags & WRITE_ZEROES_FLAG_UNMAP),
                )
            self.metrics.add(write_zeroes=1)
            return 0
        raise AssertionError(f"unparsed request type {kind}")  # parse_request refuses others

    def close(self) -> None:
        self.image.close()


def _status_view(chain: DescriptorChain) -> memoryview:
    last = chain.writable[-1]
    return last[len(last) - 1 :]
