"""The virtio-blk config space (``struct virtio_blk_config``), 60 bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class BlkConfig:
    capacity_sectors: int
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")

    def encode(self) -> bytes:
        return self.LAYOUT.pack(
            self.capacity_sectors,
            self.size_max,
            self.seg_max,
            self.cylinders,
            self.heads,
            self.sectors,
            self.blk_size,
            self.physical_block_exp,
            self.alignment_offset,
            self.min_io_size,
            self.opt_io_size,
            self.writeback,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
        )

    @classmethod
    def decode(cls, data: bytes) -> BlkConfig:
        return cls(*cls.LAYOUT.unpack(data))


assert BlkConfig.LAYOUT.size == 60
