"""Ethernet frames the device builds itself."""

from __future__ import annotations

import struct

from .constants import BROADCAST_MAC, ETH_ALEN, ETH_P_RARP

# RFC 903 reverse ARP, as QEMU's qemu_announce_self and DPDK's
# make_rarp_packet build it: hardware type Ethernet, protocol IPv4,
# opcode 3 (reverse request), sender = target = the guest's MAC, addresses 0.
_RARP = struct.Struct("!HHBBH6s4s6s4s")
RARP_REQUEST_REVERSE = 3
ETH_MIN_PAYLOAD_FRAME = 60  # frames are padded to 60 bytes before the FCS


def rarp_frame(mac: bytes) -> bytes:
    if len(mac) != ETH_ALEN:
        raise ValueError(f"MAC of {len(mac)} bytes")
    body = _RARP.pack(1, 0x0800, ETH_ALEN, 4, RARP_REQUEST_REVERSE, mac, bytes(4), mac, bytes(4))
    frame = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_RARP) + body
    return frame.ljust(ETH_MIN_PAYLOAD_FRAME, b"\0")
