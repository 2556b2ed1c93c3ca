"""struct virtio_net_config, as far as the features we offer give its fields a meaning."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import ETH_ALEN


@dataclass(frozen=True)
class NetConfig:
    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int

    # mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<6sHHH")

    def encode(self) -> bytes:
        assert len(self.mac) == ETH_ALEN
        return self.LAYOUT.pack(self.mac, self.status, self.max_virtqueue_pairs, self.mtu)

    @classmethod
    def decode(cls, data: bytes) -> NetConfig:
        data = data.ljust(cls.LAYOUT.size, b"\0")
        return cls(*cls.LAYOUT.unpack_from(data))


def parse_mac(text: str) -> bytes:
    """"52:54:00:12:34:56" -> 6 bytes; ValueError otherwise."""
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
