"""Numbers of the vhost-user protocol: request codes, header flags, feature bits.

Values come from QEMU's docs/interop/vhost-user.rst. Request codes are
``IntEnum`` so logs print names; feature words are ``IntFlag``.
"""

from __future__ import annotations

import enum

HEADER_SIZE = 12
VERSION = 0x1
MAX_FDS_PER_MESSAGE = 8
# The largest legitimate payload is GET/SET_CONFIG (12 + 256 bytes); anything much
# bigger is garbage, and reading it would let a peer make us buffer without bound.
MAX_PAYLOAD_SIZE = 4096
MAX_CONFIG_SIZE = 256
MAX_MEM_TABLE_REGIONS = 8


class HeaderFlag(enum.IntFlag):
    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


# A reply carries exactly this; QEMU rejects anything else.
REPLY_FLAGS = VERSION | HeaderFlag.REPLY


class FrontendRequest(enum.IntEnum):
    """Requests the front-end (VMM) sends on the main channel."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the backend-request channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class VirtioFeature(enum.IntFlag):
    """Transport-level virtio feature bits (device-specific bits live with the device)."""

    VHOST_F_LOG_ALL = 1 << 26
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(enum.IntFlag):
    NONE = 0
    RO = 1
    WO = 2
    RW = 3


VRING_FILE_INDEX_MASK = 0xFF
VRING_FILE_NOFD = 1 << 8
VRING_ADDR_F_LOG = 1 << 0


class DeviceStateDirection(enum.IntEnum):
    """SET_DEVICE_STATE_FD: which way the back-end's state goes through the fd."""

    SAVE = 0  # back-end -> front-end (migration source)
    LOAD = 1  # front-end -> back-end (migration destination)


class DeviceStatePhase(enum.IntEnum):
    STOPPED = 0  # every ring stopped (the "suspended" device); the only phase defined


# The u64 reply of SET_DEVICE_STATE_FD: bits 0-7 are 0 on success, bit 8 says the
# back-end returns no fd of its own (the front-end keeps using the one it sent).
DEVICE_STATE_REPLY_ERROR_MASK = 0xFF
DEVICE_STATE_REPLY_NO_FD = 1 << 8
