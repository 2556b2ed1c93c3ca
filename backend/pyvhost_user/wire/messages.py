"""One frozen dataclass per vhost-user payload layout, each with decode/encode.

Constructors validate syntax only (ranges, counts, reserved bits), so an
invalid payload object cannot exist. Meaning (is this ring index below the
number of queues? is this feature offered?) is the dispatcher's business.
Every layout is one precompiled little-endian ``struct.Struct``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    MAX_CONFIG_SIZE,
    MAX_MEM_TABLE_REGIONS,
    VRING_FILE_INDEX_MASK,
    VRING_FILE_NOFD,
    DeviceStateDirection,
    DeviceStatePhase,
    IotlbPerm,
    IotlbType,
)

U64_MAX = (1 << 64) - 1


class FieldValueError(ValueError):
    """A payload field is outside what the protocol allows."""


class PayloadSizeError(ValueError):
    """The payload bytes do not have the size this layout needs."""


def _check_size(data: bytes | memoryview, expected: int, what: str) -> None:
    if len(data) != expected:
        raise PayloadSizeError(f"{what} payload must be {expected} bytes, got {len(data)}")


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise FieldValueError(f"{name}={value} is not a u64")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise FieldValueError(f"{name}={value} is not a u32")


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (GET_FEATURES, SET_OWNER, RESET_DEVICE ...)."""

    SIZE: ClassVar[int] = 0

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Empty:
        _check_size(data, 0, "empty")
        return cls()

    def encode(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64: feature words, counts, status, and the REPLY_ACK result."""

    value: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        _check_u64("value", self.value)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> U64:
        _check_size(data, cls.LAYOUT.size, "u64")
        return cls(cls.LAYOUT.unpack(data)[0])

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringState:
    """``u32 index, u32 num``: ring size, base index, enable flag."""

    index: int
    num: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        _check_u32("index", self.index)
        _check_u32("num", self.num)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> VringState:
        _check_size(data, cls.LAYOUT.size, "vring state")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Ring addresses: front-end virtual addresses, or IOVAs with ACCESS_PLATFORM.

    ``log_guest_addr`` is a guest physical address (used-ring dirty logging).
    """

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    def __post_init__(self) -> None:
        _check_u32("index", self.index)
        _check_u32("flags", self.flags)
        if self.flags & ~1:
            raise FieldValueError(f"vring address flags {self.flags:#x} has unknown bits")
        for name in ("desc_user_addr", "used_user_addr", "avail_user_addr", "log_guest_addr"):
            _check_u64(name, getattr(self, name))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> VringAddr:
        _check_size(data, cls.LAYOUT.size, "vring address")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index in bits 0-7, bit 8 = no fd."""

    index: int
    no_fd: bool
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        if not 0 <= self.index <= VRING_FILE_INDEX_MASK:
            raise FieldValueError(f"vring file index {self.index} is not in 0..255")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> VringFile:
        _check_size(data, cls.LAYOUT.size, "vring file")
        (word,) = cls.LAYOUT.unpack(data)
        if word & ~(VRING_FILE_INDEX_MASK | VRING_FILE_NOFD):
            raise FieldValueError(f"vring file word {word:#x} has reserved bits set")
        return cls(word & VRING_FILE_INDEX_MASK, bool(word & VRING_FILE_NOFD))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.index | (VRING_FILE_NOFD if self.no_fd else 0))


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One guest memory region; the matching fd travels beside the message."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def __post_init__(self) -> None:
        for name in ("guest_phys_addr", "size", "user_addr", "mmap_offset"):
            _check_u64(name, getattr(self, name))
        if self.size == 0:
            raise FieldValueError("memory region of size 0")
        # Each range must not wrap around 2**64: the sums are used as bounds later.
        for base in ("guest_phys_addr", "user_addr", "mmap_offset"):
            if getattr(self, base) + self.size - 1 > U64_MAX:
                raise FieldValueError(f"memory region {base}+size wraps past 2**64")

    @classmethod
    def unpack_from(cls, data: bytes | memoryview, offset: int) -> MemRegion:
        return cls(*cls.LAYOUT.unpack_from(data, offset))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.guest_phys_addr, self.size, self.user_addr, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class MemTable:
    """SET_MEM_TABLE: ``u32 count, u32 padding`` then ``count`` regions, one fd each."""

    regions: tuple[MemRegion, ...]
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        if not 1 <= len(self.regions) <= MAX_MEM_TABLE_REGIONS:
            raise FieldValueError(f"memory table with {len(self.regions)} regions (1..8 allowed)")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MemTable:
        if len(data) < cls.HEAD.size:
            raise PayloadSizeError(f"memory table payload of {len(data)} bytes is too short")
        count, _padding = cls.HEAD.unpack_from(data, 0)
        if not 1 <= count <= MAX_MEM_TABLE_REGIONS:
            raise FieldValueError(f"memory table with {count} regions (1..8 allowed)")
        _check_size(data, cls.HEAD.size + count * MemRegion.LAYOUT.size, "memory table")
        return cls(
            tuple(
                MemRegion.unpack_from(data, cls.HEAD.size + i * MemRegion.LAYOUT.size)
                for i in range(count)
            )
        )

    def encode(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)


@dataclass(frozen=True, slots=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG: ``u64 padding`` then one region."""

    region: MemRegion
    SIZE: ClassVar[int] = 8 + 32

    @classmethod
    def decode(cls, data: bytes | memoryview) -> SingleMemRegion:
        _check_size(data, cls.SIZE, "single memory region")
        return cls(MemRegion.unpack_from(data, 8))

    def encode(self) -> bytes:
        return bytes(8) + self.region.encode()


@dataclass(frozen=True, slots=True)
class LogDescription:
    """SET_LOG_BASE: size and offset of the dirty log inside the fd."""

    mmap_size: int
    mmap_offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def __post_init__(self) -> None:
        _check_u64("mmap_size", self.mmap_size)
        _check_u64("mmap_offset", self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> LogDescription:
        _check_size(data, cls.LAYOUT.size, "log description")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg``: u64 iova, size, uaddr; u8 perm, u8 type; padded to 32.

    QEMU leaves garbage in ``uaddr`` and ``perm`` of an INVALIDATE, so those are
    not checked (and are normalised to 0) for that type.
    """

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")

    def __post_init__(self) -> None:
        for name in ("iova", "size", "uaddr"):
            _check_u64(name, getattr(self, name))
        if self.type not in IotlbType.__members__.values():
            raise FieldValueError(f"IOTLB message type {int(self.type)} is unknown")
        if not 0 <= self.perm <= 3:
            raise FieldValueError(f"IOTLB permission {int(self.perm)} is unknown")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> IotlbMsg:
        _check_size(data, cls.LAYOUT.size, "IOTLB message")
        iova, size, uaddr, perm, kind = cls.LAYOUT.unpack(data)
        if kind not in IotlbType._value2member_map_:
            raise FieldValueError(f"IOTLB message type {kind} is unknown")
        if kind == IotlbType.INVALIDATE:
            uaddr, perm = 0, 0
        elif perm > 3:
            raise FieldValueError(f"IOTLB permission {perm} is unknown")
        return cls(iova, size, uaddr, IotlbPerm(perm), IotlbType(kind))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.iova, self.size, self.uaddr, int(self.perm), int(self.type))


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET/SET_CONFIG: ``u32 offset, u32 size, u32 flags`` then ``size`` bytes.

    A GET_CONFIG reply with no bytes means the back-end refused.
    """

    offset: int
    size: int
    flags: int
    data: bytes
    HEAD: ClassVar[struct.Struct] = struct.Struct("<III")

    def __post_init__(self) -> None:
        _check_u32("offset", self.offset)
        _check_u32("flags", self.flags)
        if not 0 <= self.size <= MAX_CONFIG_SIZE:
            raise FieldValueError(f"config size {self.size} is above {MAX_CONFIG_SIZE}")
        if self.offset + self.size > MAX_CONFIG_SIZE:
            raise FieldValueError(f"config range {self.offset}+{self.size} ends past 256")
        if self.flags & ~1:
            raise FieldValueError(f"config flags {self.flags:#x} has unknown bits")
        if len(self.data) not in (0, self.size):
            raise FieldValueError(f"config carries {len(self.data)} bytes for size {self.size}")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ConfigSpace:
        if len(data) < cls.HEAD.size:
            raise PayloadSizeError(f"config payload of {len(data)} bytes is too short")
        offset, size, flags = cls.HEAD.unpack_from(data, 0)
        body = bytes(data[cls.HEAD.size :])
        if len(body) != size:
            raise PayloadSizeError(f"config payload carries {len(body)} bytes, header says {size}")
        return cls(offset, size, flags, body)

    def encode(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True, slots=True)
class InflightDescription:
    """GET/SET_INFLIGHT_FD: ``u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size``."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")

    def __post_init__(self) -> None:
        _check_u64("mmap_size", self.mmap_size)
        _check_u64("mmap_offset", self.mmap_offset)
        for name in ("num_queues", "queue_size"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise FieldValueError(f"{name} is not a u16")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> InflightDescription:
        # QEMU sends sizeof(VhostUserInflight) = 24 (packed struct padded by the union).
        if len(data) == 20:
            return cls(*struct.unpack("<QQHH", data))
        _check_size(data, cls.LAYOUT.size, "inflight description")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


@dataclass(frozen=True, slots=True)
class VringArea:
    """VRING_HOST_NOTIFIER_MSG: ``u64 index|flags, u64 size, u64 offset``."""

    index_and_flags: int
    size: int
    offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQ")

    def __post_init__(self) -> None:
        for name in ("index_and_flags", "size", "offset"):
            _check_u64(name, getattr(self, name))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> VringArea:
        _check_size(data, cls.LAYOUT.size, "vring area")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.index_and_flags, self.size, self.offset)


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD: ``u32 direction (0 save, 1 load), u32 phase (0 stopped)``."""

    direction: int
    phase: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        if self.direction not in DeviceStateDirection._value2member_map_:
            raise FieldValueError(f"device state direction {self.direction} is unknown")
        if self.phase not in DeviceStatePhase._value2member_map_:
            raise FieldValueError(f"device state phase {self.phase} is unknown")

    @classmethod
    def decode(cls, data: bytes | memoryview) -> DeviceStateTransfer:
        _check_size(data, cls.LAYOUT.size, "device state transfer")
        return cls(*cls.LAYOUT.unpack(data))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.direction, self.phase)


Payload = (
    Empty
    | U64
    | VringState
    | VringAddr
    | VringFile
    | MemTable
    | SingleMemRegion
    | LogDescription
    | IotlbMsg
    | ConfigSpace
    | InflightDescription
    | VringArea
    | DeviceStateTransfer
)
