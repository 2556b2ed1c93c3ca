"""struct virtio_net_hdr: what precedes every frame on the TX and RX queues.

We offer no checksum or segmentation offload, so a header we write is all
zero but for num_buffers, and a header we read must ask for neither (a
driver that sets them anyway broke the negotiation: the frame is dropped).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .constants import NET_HDR_LEGACY_BYTES, NET_HDR_V1_BYTES, NetFeature

_HDR: Final = struct.Struct("<BBHHHHH")  # flags gso_type hdr_len gso_size csum_start csum_offset num_buffers
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_GSO_NONE: Final = 0
VERSION_1: Final = 1 << 32


def header_bytes(features: int) -> int:
    """12 with VERSION_1 or MRG_RXBUF (num_buffers is always there), else 10."""
    if features & (VERSION_1 | NetFeature.MRG_RXBUF):
        return NET_HDR_V1_BYTES
    return NET_HDR_LEGACY_BYTES


@dataclass(frozen=True)
class NetHeader:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def encode(self, size: int = NET_HDR_V1_BYTES) -> bytes:
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                         self.csum_start, self.csum_offset, self.num_buffers)[:size]

    @classmethod
    def decode(cls, data: bytes) -> NetHeader:
        return cls(*_HDR.unpack(bytes(data[:NET_HDR_V1_BYTES]).ljust(NET_HDR_V1_BYTES, b"\0")))

    @property
    def asks_offload(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) or self.gso_type != VIRTIO_NET_HDR_GSO_NONE


def rx_header(size: int, num_buffers: int = 1) -> bytes:
    """The header the device puts before a received frame."""
    return NetHeader(num_buffers=num_buffers).encode(size)
