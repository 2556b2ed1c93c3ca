"""The pyvhost-user vendor extension: address spaces, groups, IOTLB persistence, RESET_MAP.

Specified in docs/vhost-user-asid-extension.rst. Feature bits sit far above
QEMU's (it knows bits 0-19 in 10.0 and masks what it does not know), and the
request codes far above QEMU's (45 at most today), so a stock front-end
never negotiates or sends any of this.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from .codec import FRONTEND_LAYOUTS, VENDOR_REQUEST_NAMES, Layout
from .messages import U64, Empty, IotlbMsg, PayloadSizeError, VringState


class VendorProtocolFeature(enum.IntFlag):
    ADDRESS_SPACES = 1 << 48  # ASIDs, groups, IOTLB with ASID, batches, RESET_MAP
    IOTLB_PERSIST = 1 << 49  # device reset keeps every ASID's IOTLB


class VendorRequest(enum.IntEnum):
    GET_NUM_ASIDS = 0x4001
    GET_VRING_GROUP = 0x4002
    SET_GROUP_ASID = 0x4003
    IOTLB_MSG_ASID = 0x4004
    IOTLB_BATCH_BEGIN = 0x4005
    IOTLB_BATCH_END = 0x4006
    RESET_MAP = 0x4007


@dataclass(frozen=True, slots=True)
class AsidIotlbMsg:
    """``u32 asid, u32 reserved`` then a ``struct vhost_iotlb_msg`` (as vhost_msg_v2)."""

    asid: int
    msg: IotlbMsg
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> AsidIotlbMsg:
        if len(data) != cls.HEAD.size + IotlbMsg.LAYOUT.size:
            raise PayloadSizeError(f"ASID IOTLB payload must be 40 bytes, got {len(data)}")
        asid, _reserved = cls.HEAD.unpack_from(data, 0)
        return cls(asid, IotlbMsg.decode(data[cls.HEAD.size :]))

    def encode(self) -> bytes:
        return self.HEAD.pack(self.asid, 0) + self.msg.encode()


V = VendorRequest
EXTENSION_LAYOUTS: dict[int, Layout] = {
    V.GET_NUM_ASIDS: Layout(Empty, U64),
    V.GET_VRING_GROUP: Layout(VringState, VringState),
    V.SET_GROUP_ASID: Layout(VringState),  # index = group, num = asid
    V.IOTLB_MSG_ASID: Layout(AsidIotlbMsg, U64),
    V.IOTLB_BATCH_BEGIN: Layout(Empty),
    V.IOTLB_BATCH_END: Layout(Empty),
    V.RESET_MAP: Layout(U64),  # the asid
}

# Part of the one codec both sides share: decoding them costs nothing when the
# features are not negotiated, and the session refuses them then.
FRONTEND_LAYOUTS.update(EXTENSION_LAYOUTS)
VENDOR_REQUEST_NAMES.update({int(code): code.name for code in VendorRequest})
