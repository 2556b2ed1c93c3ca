"""Sans-IO codec: bytes and fds in, typed ``Message`` objects out, and back.

There is no socket here. A ``MessageReader`` is fed whatever ``recvmsg``
returned (``receive(data, fds)``) and hands out complete messages
(``next_message()``), or ``NEED_DATA``. ``encode_message`` turns a ``Message``
into the bytes and fds to pass to one ``sendmsg``. The back-end and the
reference front-end share this module, and both directions of both channels
(main channel, backend-request channel) are described by one table.

Fds: SCM_RIGHTS data travels with the ``sendmsg`` that carried it, but a
Unix stream ``recvmsg`` that covers several messages returns the fds of the
*last* one it touched (the kernel stops after a segment with fds, not before).
So the I/O side must read one message at a time: exactly ``bytes_needed()``
bytes per read, the header first. Then every chunk lies inside one message,
and the fds that came with a chunk belong to the message it is part of.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from . import errors
from .constants import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAGS,
    VERSION,
    DEVICE_STATE_REPLY_ERROR_MASK,
    DEVICE_STATE_REPLY_NO_FD,
    BackendRequest,
    FrontendRequest,
    HeaderFlag,
)
from .messages import (
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    FieldValueError,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    MemTable,
    Payload,
    PayloadSizeError,
    SingleMemRegion,
    U64,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

HEADER: Final = struct.Struct("<III")
F = FrontendRequest
B = BackendRequest

# How many fds a message may carry, as a function of its decoded payload:
# returns (minimum, maximum).
FdRule = Callable[[Payload], tuple[int, int]]


def _no_fds(_p: Payload) -> tuple[int, int]:
    return (0, 0)


def _one_fd(_p: Payload) -> tuple[int, int]:
    return (1, 1)


def _vring_file_fds(p: Payload) -> tuple[int, int]:
    assert isinstance(p, VringFile)
    return (0, 0) if p.no_fd else (1, 1)


def _mem_table_fds(p: Payload) -> tuple[int, int]:
    assert isinstance(p, MemTable)
    return (len(p.regions), len(p.regions))


def _zero_or_one_fd(_p: Payload) -> tuple[int, int]:
    # REM_MEM_REG: "the back-end MAY accept messages with one file descriptor"
    # (and must close it); VRING_HOST_NOTIFIER_MSG: an fd registers, none removes.
    return (0, 1)


def _device_state_reply_fds(p: Payload) -> tuple[int, int]:
    # An fd comes back only with success and the no-fd bit clear: the back-end's
    # own channel, which the front-end must then use instead of its own.
    assert isinstance(p, U64)
    if p.value & (DEVICE_STATE_REPLY_ERROR_MASK | DEVICE_STATE_REPLY_NO_FD):
        return (0, 0)
    return (1, 1)


@dataclass(frozen=True, slots=True)
class Layout:
    """What a request carries, and what its reply carries."""

    request: type
    reply: type | None = None  # None: no reply unless NEED_REPLY (then a U64 ack)
    request_fds: FdRule = _no_fds
    reply_fds: FdRule = _no_fds


FRONTEND_LAYOUTS: Final[dict[int, Layout]] = {
    F.GET_FEATURES: Layout(Empty, U64),
    F.SET_FEATURES: Layout(U64),
    F.SET_OWNER: Layout(Empty),
    F.RESET_OWNER: Layout(Empty),
    F.SET_MEM_TABLE: Layout(MemTable, request_fds=_mem_table_fds),
    # The reply to SET_LOG_BASE is due when LOG_SHMFD is negotiated (QEMU waits
    # for it although it does not set NEED_REPLY).
    F.SET_LOG_BASE: Layout(LogDescription, U64, request_fds=_one_fd),
    F.SET_LOG_FD: Layout(Empty, request_fds=_one_fd),
    F.SET_VRING_NUM: Layout(VringState),
    F.SET_VRING_ADDR: Layout(VringAddr),
    F.SET_VRING_BASE: Layout(VringState),
    F.GET_VRING_BASE: Layout(VringState, VringState),
    F.SET_VRING_KICK: Layout(VringFile, request_fds=_vring_file_fds),
    F.SET_VRING_CALL: Layout(VringFile, request_fds=_vring_file_fds),
    F.SET_VRING_ERR: Layout(VringFile, request_fds=_vring_file_fds),
    F.GET_PROTOCOL_FEATURES: Layout(Empty, U64),
    F.SET_PROTOCOL_FEATURES: Layout(U64),
    F.GET_QUEUE_NUM: Layout(Empty, U64),
    F.SET_VRING_ENABLE: Layout(VringState),
    F.SEND_RARP: Layout(U64),
    F.NET_SET_MTU: Layout(U64),
    F.SET_BACKEND_REQ_FD: Layout(Empty, request_fds=_one_fd),
    F.IOTLB_MSG: Layout(IotlbMsg, U64),
    F.SET_VRING_ENDIAN: Layout(VringState),
    F.GET_CONFIG: Layout(ConfigSpace, ConfigSpace),
    F.SET_CONFIG: Layout(ConfigSpace),
    F.GET_INFLIGHT_FD: Layout(InflightDescription, InflightDescription, reply_fds=_one_fd),
    F.SET_INFLIGHT_FD: Layout(InflightDescription, request_fds=_one_fd),
    F.RESET_DEVICE: Layout(Empty),
    F.VRING_KICK: Layout(VringState),
    F.GET_MAX_MEM_SLOTS: Layout(Empty, U64),
    F.ADD_MEM_REG: Layout(SingleMemRegion, request_fds=_one_fd),
    F.REM_MEM_REG: Layout(SingleMemRegion, request_fds=_zero_or_one_fd),
    F.SET_STATUS: Layout(U64),
    F.GET_STATUS: Layout(Empty, U64),
    F.SET_DEVICE_STATE_FD: Layout(
        DeviceStateTransfer, U64, request_fds=_one_fd, reply_fds=_device_state_reply_fds
    ),
    F.CHECK_DEVICE_STATE: Layout(Empty, U64),
}

BACKEND_LAYOUTS: Final[dict[int, Layout]] = {
    B.IOTLB_MSG: Layout(IotlbMsg),
    B.CONFIG_CHANGE_MSG: Layout(Empty),
    B.VRING_HOST_NOTIFIER_MSG: Layout(VringArea, request_fds=_zero_or_one_fd),
}


def _payload_decoder(cls: type) -> Callable[[memoryview], Payload]:
    return cls.decode  # type: ignore[no-any-return, attr-defined]


@dataclass(slots=True)
class Message:
    """One vhost-user message: a request or a reply, with its fds.

    ``fds`` are owned by whoever holds the message: the receiver must close or
    keep each one (``close_fds`` helps).
    """

    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = field(default=())
    backend_channel: bool = False  # a BackendRequest code (backend-request channel)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    def close_fds(self) -> None:
        close_all(self.fds)
        self.fds = ()

    def __str__(self) -> str:  # the protocol trace line
        name = request_name(self.request, self.backend_channel)
        extra = " NEED_REPLY" if self.need_reply else ""
        fds = f" fds={len(self.fds)}" if self.fds else ""
        return f"{name}{' reply' if self.is_reply else ''}{extra} {describe_payload(self.payload)}{fds}"


def describe_payload(payload: Payload) -> str:
    """A trace-friendly rendering: addresses in hex, config bytes abbreviated."""
    if isinstance(payload, Empty):
        return ""
    if isinstance(payload, MemTable):
        return "; ".join(describe_payload(r) for r in payload.regions)
    if isinstance(payload, SingleMemRegion):
        return describe_payload(payload.region)
    parts = []
    for f in dataclasses.fields(payload):
        name, value = f.name, getattr(payload, f.name)
        if dataclasses.is_dataclass(value):
            parts.append(describe_payload(value))  # type: ignore[arg-type]
        elif isinstance(value, bytes):
            shown = value[:16].hex()
            parts.append(f"{name}={shown}{'...' if len(value) > 16 else ''}")
        elif isinstance(value, enum.Enum):
            parts.append(f"{name}={value.name}")
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 4096:
            parts.append(f"{name}={value:#x}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def request_name(code: int, backend_channel: bool = False) -> str:
    names = BackendRequest if backend_channel else FrontendRequest
    try:
        return ("BACKEND_" if backend_channel else "") + names(code).name
    except ValueError:
        return VENDOR_REQUEST_NAMES.get(code, f"REQUEST_{code}")


# Filled by protocol extensions that add request codes (so traces name them).
VENDOR_REQUEST_NAMES: dict[int, str] = {}


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


NEED_DATA: Final = object()  # sentinel: feed more bytes


class MessageReader:
    """Reassembles messages from a byte stream and attached fds.

    ``layouts`` names the request namespace of the channel (front-end requests
    on the main channel, back-end requests on the backend-request channel).
    ``expect_replies`` says whether this side reads requests (False) or the
    replies to its own requests (True); reply layouts are looked up by request
    code. A ``FramingError`` is sticky: every later call raises it again.
    """

    def __init__(
        self,
        layouts: dict[int, Layout] = FRONTEND_LAYOUTS,
        *,
        expect_replies: bool = False,
        extra_layouts: dict[int, Layout] | None = None,
    ) -> None:
        self._layouts = dict(layouts)
        if extra_layouts:
            self._layouts.update(extra_layouts)
        self._expect_replies = expect_replies
        self._buffer = bytearray()
        self._consumed = 0  # stream offset of _buffer[0]
        self._fd_chunks: list[tuple[int, list[int]]] = []  # (stream offset, fds)
        self._failed: errors.FramingError | None = None
        self._backend_channel = layouts is BACKEND_LAYOUTS

    def add_layouts(self, extra: dict[int, Layout]) -> None:
        self._layouts.update(extra)

    def receive(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed what one recvmsg returned. Empty data means the peer closed."""
        fds = list(fds)
        if self._failed:
            close_all(fds)
            raise self._failed
        if fds:
            self._fd_chunks.append((self._consumed + len(self._buffer), fds))
        self._buffer += data

    def bytes_needed(self) -> int:
        """How many bytes complete the header, or else the message being read."""
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        size = HEADER.unpack_from(self._buffer, 0)[2]
        return max(0, HEADER_SIZE + min(size, MAX_PAYLOAD_SIZE) - len(self._buffer))

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        """Close every fd still waiting for its message."""
        for _offset, fds in self._fd_chunks:
            close_all(fds)
        self._fd_chunks.clear()
        self._buffer.clear()

    def next_message(self) -> Message | object:
        """Return the next complete message, or ``NEED_DATA``.

        Raises ``FramingError`` (drop the connection) or a ``MalformedMessage``
        subclass (the message was consumed; refuse it and go on).
        """
        if self._failed:
            raise self._failed
        if len(self._buffer) < HEADER_SIZE:
            return NEED_DATA
        request, flags, size = HEADER.unpack_from(self._buffer, 0)
        try:
            self._check_header(request, flags, size)
        except errors.FramingError as exc:
            self._failed = exc
            self.close()
            raise
        total = HEADER_SIZE + size
        if len(self._buffer) < total:
            return NEED_DATA
        payload_bytes = memoryview(bytes(self._buffer[HEADER_SIZE:total]))
        fds = self._take_fds(self._consumed, total)
        del self._buffer[:total]
        self._consumed += total
        try:
            return self._decode(request, flags, payload_bytes, fds)
        except errors.MalformedMessage:
            close_all(fds)
            raise

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if flags & HeaderFlag.VERSION_MASK != VERSION:
            raise errors.FramingError(
                f"header of request {request}: version {flags & 3} (only 1 exists)"
            )
        if flags & ~0xF:
            raise errors.FramingError(f"header of request {request}: unknown flags {flags:#x}")
        if size > MAX_PAYLOAD_SIZE:
            raise errors.FramingError(
                f"header of request {request}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}"
            )

    def _take_fds(self, start: int, length: int) -> tuple[int, ...]:
        taken: list[int] = []
        kept: list[tuple[int, list[int]]] = []
        for offset, fds in self._fd_chunks:
            if start <= offset < start + length:
                taken.extend(fds)
            else:
                kept.append((offset, fds))
        self._fd_chunks = kept
        if len(taken) > MAX_FDS_PER_MESSAGE:
            # Never more than 8 by the protocol; a flood of fds is a hostile peer.
            close_all(taken)
            self._failed = errors.FramingError(f"{len(taken)} fds on one message (at most 8)")
            raise self._failed
        return tuple(taken)

    def _decode(self, request: int, flags: int, data: memoryview, fds: tuple[int, ...]) -> Message:
        is_reply = bool(flags & HeaderFlag.REPLY)

        def fail(kind: type[errors.MalformedMessage], reason: str) -> errors.MalformedMessage:
            return kind(reason, request=request, flags=flags)

        layout = self._layouts.get(request)
        name = request_name(request, self._backend_channel)
        if layout is None:
            raise fail(errors.UnknownRequest, f"unknown request code {request}")
        if is_reply != self._expect_replies:
            raise fail(
                errors.BadFlags,
                f"{name}: {'a reply' if is_reply else 'a request'} where "
                f"{'replies' if self._expect_replies else 'requests'} are expected",
            )
        if is_reply and flags & HeaderFlag.NEED_REPLY:
            raise fail(errors.BadFlags, f"{name}: a reply must not ask for a reply")
        payload_type = layout.request
        fd_rule = layout.request_fds
        if is_reply:
            # A reply is either the request's own reply layout, or a U64 ack.
            payload_type = layout.reply or U64
            fd_rule = layout.reply_fds
        try:
            payload = payload_type.decode(data)  # type: ignore[attr-defined]
        except PayloadSizeError as exc:
            raise fail(errors.BadPayloadSize, f"{name}: {exc}") from None
        except FieldValueError as exc:
            raise fail(errors.InvalidField, f"{name}: {exc}") from None
        low, high = fd_rule(payload)
        if len(fds) < low:
            raise fail(errors.MissingFds, f"{name}: needs {low} fd(s), got {len(fds)}")
        if len(fds) > high:
            raise fail(errors.UnexpectedFds, f"{name}: allows {high} fd(s), got {len(fds)}")
        return Message(request, flags, payload, fds, self._backend_channel)


def encode_message(message: Message) -> tuple[bytes, tuple[int, ...]]:
    """The bytes and fds for one sendmsg."""
    body = message.payload.encode()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(body)} bytes is too large")
    if len(message.fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"{len(message.fds)} fds on one message (at most 8)")
    return HEADER.pack(message.request, message.flags, len(body)) + body, message.fds


def request(
    code: int,
    payload: Payload | None = None,
    *,
    fds: Iterable[int] = (),
    need_reply: bool = False,
    backend_channel: bool = False,
) -> Message:
    """Build a request message (flags: version 1, NEED_REPLY if asked)."""
    flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    body = payload if payload is not None else Empty()
    return Message(code, int(flags), body, tuple(fds), backend_channel)


def reply(
    code: int, payload: Payload, *, fds: Iterable[int] = (), backend_channel: bool = False
) -> Message:
    """Build a reply message: flags exactly VERSION|REPLY (QEMU rejects anything else)."""
    return Message(code, int(REPLY_FLAGS), payload, tuple(fds), backend_channel)


def ack(code: int, success: bool, *, backend_channel: bool = False) -> Message:
    """The REPLY_ACK answer: u64 0 on success, non-zero on failure."""
    return reply(code, U64(0 if success else 1), backend_channel=backend_channel)
