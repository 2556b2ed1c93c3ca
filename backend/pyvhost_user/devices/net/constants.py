"""virtio-net numbers (virtio 1.2, 5.1 "Network Device")."""

from __future__ import annotations

import enum
from typing import Final


class NetFeature(enum.IntFlag):
    """Device feature bits (5.1.3)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23


class NetStatus(enum.IntFlag):
    """virtio_net_config.status."""

    LINK_UP = 1
    ANNOUNCE = 2


class CtrlClass(enum.IntEnum):
    """virtio_net_ctrl.class (5.1.6.5)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


class CtrlRx(enum.IntEnum):
    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class CtrlMac(enum.IntEnum):
    TABLE_SET = 0
    ADDR_SET = 1


class CtrlVlan(enum.IntEnum):
    ADD = 0
    DEL = 1


class CtrlAnnounce(enum.IntEnum):
    ACK = 0


class CtrlMq(enum.IntEnum):
    VQ_PAIRS_SET = 0


CTRL_OK: Final = 0
CTRL_ERR: Final = 1

# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset (10 bytes), then num_buffers with VERSION_1 or MRG_RXBUF.
NET_HDR_LEGACY_BYTES: Final = 10
NET_HDR_V1_BYTES: Final = 12

ETH_ALEN: Final = 6
ETH_HLEN: Final = 14
ETH_MIN_FRAME: Final = ETH_HLEN
ETH_P_8021Q: Final = 0x8100
ETH_P_RARP: Final = 0x8035
VLAN_VID_LIMIT: Final = 4096
BROADCAST_MAC: Final = b"\xff" * ETH_ALEN

# Spec 5.1.4: max_virtqueue_pairs is 1..0x8000.
MAX_QUEUE_PAIRS: Final = 0x8000
# QEMU's MAC_TABLE_ENTRIES: past it a table "overflows" and its kind is let through.
MAC_TABLE_ENTRIES: Final = 64
