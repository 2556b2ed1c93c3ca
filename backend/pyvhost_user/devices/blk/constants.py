"""virtio-blk numbers from the virtio 1.x specification (5.2)."""

from __future__ import annotations

import enum
from typing import Final

SECTOR_SIZE: Final = 512
SECTOR_SHIFT: Final = 9
ID_BYTES: Final = 20  # VIRTIO_BLK_ID_BYTES


class BlkFeature(enum.IntFlag):
    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class BlkRequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


WRITE_ZEROES_FLAG_UNMAP: Final = 1
