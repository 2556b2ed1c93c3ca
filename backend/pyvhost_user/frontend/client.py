"""The reference vhost-user front-end: what QEMU's vhost-user code sends, without a VM.

``Frontend`` has one method per front-end request (each waits for the reply
or ack the request calls for, with a timeout) and the multi-message sequences
of QEMU 7.2 and 10.0 (``handshake``, ``start_device``, ``stop_device``,
``reboot``), adapted to what the backend offers the way QEMU adapts. Where the
sequences come from: QEMU's hw/virtio/vhost.c and vhost-user.c, and the traces
in the project's vhost-user facts page.

Replies are checked strictly: flags exactly ``VERSION|REPLY``, the request code
of the request, the payload layout of the request. A message the backend sends
when none is due is reported at the next send.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..wire import (
    BACKEND_LAYOUTS,
    FRONTEND_LAYOUTS,
    NEED_DATA,
    ConfigSpace,
    FrontendRequest,
    InflightDescription,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    ProtocolFeature,
    SingleMemRegion,
    U64,
    VirtioFeature,
    VringAddr,
    VringFile,
    VringState,
    WireError,
    close_all,
    encode_message,
    reply,
    request,
)
from ..wire.constants import MAX_FDS_PER_MESSAGE, REPLY_FLAGS, VRING_ADDR_F_LOG
from ..wire.messages import Payload
from .errors import (
    BackendClosed,
    BackendRefused,
    FrontendError,
    FrontendTimeout,
    NotNegotiated,
    ProtocolViolation,
)
from .guest_ram import GuestRam, RamRegion
from .split_ring import SplitRing

F = FrontendRequest
PF = ProtocolFeature
RECV_SIZE: Final = 65536
DEFAULT_TIMEOUT: Final = 5.0

# virtio device status bits (virtio 1.x, 2.1)
STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8

# Negotiating these makes the front-end promise things a Unix-socket front-end
# cannot keep (in-band notifications, Xen grant mappings): never.
NEVER_NEGOTIATED: Final = PF.INBAND_NOTIFICATIONS | PF.XEN_MMAP

MemoryMode = Literal["auto", "slots", "table"]
OWN_FD: Final = "own"  # use the eventfd the front-end made for this queue
FdChoice = int | None | Literal["own"]


def _pick_fd(choice: FdChoice, own: int) -> int | None:
    return own if choice == OWN_FD else choice  # type: ignore[return-value]


@dataclass(frozen=True)
class Profile:
    """How one QEMU version drives a vhost-user device."""

    name: str
    known_protocol_features: int  # the bits this QEMU version knows (and so negotiates)
    need_reply_on_vring_enable: bool  # 10.0 waits for SET_VRING_ENABLE, 7.2 does not
    # Where SET_STATUS 0 goes on stop: 7.2 sends it first (vhost_user_dev_start(false)),
    # 10.0 after GET_VRING_BASE (vhost_user_reset_status).
    status_reset_before_ring_stop: bool


PROFILES: Final[dict[str, Profile]] = {
    "qemu-7.2": Profile("qemu-7.2", (1 << 17) - 1, False, True),
    "qemu-10.0": Profile("qemu-10.0", (1 << 20) - 1, True, False),
}


@dataclass(eq=False)
class QueueState:
    """The front-end's side of one ring: its eventfds, ring and saved base."""

    index: int
    kick_fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    # The "guest notifier": where completions are waited for.
    call_fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    # What QEMU installs at init (its masked notifier) before the guest notifier.
    masked_call_fd: int = field(
        default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    )
    err_fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    ring: SplitRing | None = None
    stopped_base: int | None = None  # the last GET_VRING_BASE answer, the next start's base

    def close(self) -> None:
        close_all((self.kick_fd, self.call_fd, self.masked_call_fd, self.err_fd))

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def clear_call(self) -> bool:
        """Consume a pending call notification; True if there was one."""
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        return True


class Frontend:
    """A vhost-user front-end on a connected Unix socket.

    ``ram`` is the guest RAM to offer (created, and then owned, if None).
    ``memory_mode``: "auto" does what QEMU does (ADD_MEM_REG when
    CONFIGURE_MEM_SLOTS is negotiated, else SET_MEM_TABLE); "slots"/"table"
    force one. ``history`` records every message sent and received.
    """

    def __init__(
        self,
        sock: socket.socket,
        ram: GuestRam | None = None,
        *,
        profile: str = "qemu-10.0",
        timeout: float = DEFAULT_TIMEOUT,
        memory_mode: MemoryMode = "auto",
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.sock = sock
        self.profile = PROFILES[profile]
        self.timeout = timeout
        self.memory_mode = memory_mode
        self._owns_ram = ram is None
        self.ram = ram if ram is not None else GuestRam()
        self._trace = trace
        self._reader = MessageReader(FRONTEND_LAYOUTS, expect_replies=True)
        self.history: list[tuple[Literal["sent", "received"], Message]] = []
        self.queues: dict[int, QueueState] = {}
        # What the backend offered, and what was negotiated.
        self.offered_features: int | None = None
        self.acked_features: int = 0
        self.offered_protocol_features: int = 0
        self.protocol_features: int = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.config: bytes = b""
        self._sent_regions: list[RamRegion] = []
        self.backend_channel: socket.socket | None = None
        self._backend_reader = MessageReader(BACKEND_LAYOUTS)
        self.inflight: tuple[InflightDescription, int] | None = None
        self._started_sizes: list[int] = []
        self._driver_features: int = 0

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        ram: GuestRam | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **options: object,
    ) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, ram, timeout=timeout, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        """Hang up and release every fd (and the RAM, if this front-end made it)."""
        self.sock.close()
        self._reader.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self._backend_reader.close()
        for queue in self.queues.values():
            if queue.ring is not None and not self._owns_ram:
                queue.ring.release()  # the caller's RAM outlives us: give the space back
            queue.close()
        self.queues.clear()
        if self.inflight is not None:
            close_all((self.inflight[1],))
            self.inflight = None
        if self._owns_ram:
            self.ram.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- negotiated state ----------------------------------------------------
    def has_protocol_feature(self, feature: int) -> bool:
        return self.protocol_features & feature == feature

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol_feature(PF.REPLY_ACK)

    @property
    def protocol_features_negotiated(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES offered: rings start disabled, SET_VRING_ENABLE used."""
        return bool((self.offered_features or 0) & VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)

    def queue(self, index: int) -> QueueState:
        """The front-end state of ring ``index`` (eventfds made on first use)."""
        if index not in self.queues:
            self.queues[index] = QueueState(index)
        return self.queues[index]

    # -- raw I/O ---------------------------------------------------------------
    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _log(self, direction: Literal["sent", "received"], message: Message) -> None:
        self.history.append((direction, message))
        if self._trace:
            self._trace(f"{'->' if direction == 'sent' else '<-'} {message}")

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (and fds) as they are: for malformed messages."""
        self._check_nothing_pending()
        self._sendmsg(self.sock, data, fds)

    def send(self, message: Message) -> None:
        """Send one message; no reply is read (see ``receive``)."""
        self._check_nothing_pending()
        data, fds = encode_message(message)
        self._log("sent", message)
        self._sendmsg(self.sock, data, fds)

    def _sendmsg(self, sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
        sock.settimeout(self.timeout)
        try:
            if fds:
                sent = socket.send_fds(sock, [data], list(fds))
                if sent < len(data):
                    sock.sendall(data[sent:])
            else:
                sock.sendall(data)
        except TimeoutError:
            raise FrontendTimeout(f"backend did not take a {len(data)}-byte message") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(f"backend closed the connection: {exc}") from None

    def _check_nothing_pending(self) -> None:
        """A backend speaks on the main channel only when asked: anything waiting is a fault."""
        if self._reader.buffered_bytes or select.select([self.sock], [], [], 0)[0]:
            try:
                message = self._receive(self.sock, self._reader, self._deadline(0.5))
            except BackendClosed:
                raise
            except FrontendTimeout:
                raise ProtocolViolation("a partial message arrived unasked") from None
            message.close_fds()
            raise ProtocolViolation(f"backend sent {message} when no reply was due")

    def _receive(self, sock: socket.socket, reader: MessageReader, deadline: float) -> Message:
        while True:
            try:
                message = reader.next_message()
            except WireError as exc:
                raise ProtocolViolation(f"malformed message from the backend: {exc}") from exc
            if message is not NEED_DATA:
                assert isinstance(message, Message)
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrontendTimeout("backend did not answer in time")
            sock.settimeout(remaining)
            try:
                data, fds, msg_flags, _ = socket.recv_fds(sock, RECV_SIZE, MAX_FDS_PER_MESSAGE)
            except TimeoutError:
                raise FrontendTimeout("backend did not answer in time") from None
            except ConnectionResetError:
                data, fds, msg_flags = b"", [], 0
            if msg_flags & socket.MSG_CTRUNC:
                close_all(fds)
                raise ProtocolViolation("more fds than one message may carry")
            if not data:
                close_all(fds)
                raise BackendClosed("backend closed the connection")
            reader.receive(data, fds)

    def receive(self, timeout: float | None = None) -> Message:
        """The next message on the main channel (for tests that ``send`` by hand)."""
        message = self._receive(self.sock, self._reader, self._deadline(timeout))
        self._log("received", message)
        return message

    def receive_reply(self, code: int, timeout: float | None = None) -> Message:
        """The reply to request ``code``, checked strictly."""
        message = self.receive(timeout)
        if message.flags != REPLY_FLAGS:
            message.close_fds()
            raise ProtocolViolation(f"reply flags {message.flags:#x}, not {REPLY_FLAGS:#x}")
        if message.request != code:
            message.close_fds()
            raise ProtocolViolation(
                f"reply to {F(code).name} carries request code {message.request}"
            )
        return message

    def _request(
        self,
        code: FrontendRequest,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
        sync: bool = False,
    ) -> Message | None:
        """Send a request and wait for what it calls for.

        A request with a reply layout returns the reply. ``need_reply`` sets
        NEED_REPLY (only when REPLY_ACK is negotiated, as QEMU does) and checks
        the ack. ``sync`` is QEMU's enforce_reply(): a request QEMU must know
        was processed, which without REPLY_ACK it follows with GET_FEATURES.
        """
        ack_requested = (need_reply or sync) and self.reply_ack
        message = request(code, payload, fds=fds, need_reply=ack_requested)
        self.send(message)
        if FRONTEND_LAYOUTS[code].reply is not None and code != F.SET_LOG_BASE:
            return self.receive_reply(code)
        if ack_requested:
            answer = self.receive_reply(code)
            assert isinstance(answer.payload, U64)
            if answer.payload.value != 0:
                raise BackendRefused(code, answer.payload.value)
            return answer
        if sync:
            self.get_features()
        return None

    def _u64_reply(self, code: FrontendRequest) -> int:
        answer = self._request(code)
        assert answer is not None and isinstance(answer.payload, U64)
        return answer.payload.value

    # -- one method per front-end request -------------------------------------
    def get_features(self) -> int:
        features = self._u64_reply(F.GET_FEATURES)
        if self.offered_features is None:
            self.offered_features = features
        return features

    def set_features(self, features: int) -> None:
        # QEMU waits only when it turns dirty logging on.
        logging = bool(features & VirtioFeature.VHOST_F_LOG_ALL)
        self._request(F.SET_FEATURES, U64(features), sync=logging)
        self.acked_features = features

    def get_protocol_features(self) -> int:
        self.offered_protocol_features = self._u64_reply(F.GET_PROTOCOL_FEATURES)
        return self.offered_protocol_features

    def set_protocol_features(self, features: int) -> None:
        self._request(F.SET_PROTOCOL_FEATURES, U64(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self._request(F.SET_OWNER)

    def reset_owner(self) -> None:
        self._request(F.RESET_OWNER)

    def get_queue_num(self) -> int:
        self.queue_num = self._u64_reply(F.GET_QUEUE_NUM)
        return self.queue_num

    def get_max_mem_slots(self) -> int:
        self.max_mem_slots = self._u64_reply(F.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_mem_table(self, regions: Sequence[RamRegion] | None = None) -> None:
        regions = list(self.ram.regions if regions is None else regions)
        table = MemTable(tuple(r.mem_region() for r in regions))
        self._request(F.SET_MEM_TABLE, table, fds=[r.fd for r in regions], need_reply=True)
        self._sent_regions = regions

    def add_mem_reg(self, region: RamRegion) -> None:
        self._request(
            F.ADD_MEM_REG, SingleMemRegion(region.mem_region()), fds=[region.fd], need_reply=True
        )
        self._sent_regions.append(region)

    def rem_mem_reg(self, region: RamRegion, *, with_fd: bool = False) -> None:
        """REM_MEM_REG as QEMU sends it: no fd, mmap_offset 0 (``with_fd`` adds the fd)."""
        payload = SingleMemRegion(MemRegion(region.gpa, region.size, region.user_addr, 0))
        self._request(
            F.REM_MEM_REG, payload, fds=[region.fd] if with_fd else [], need_reply=True
        )
        self._sent_regions = [r for r in self._sent_regions if r is not region]

    def set_vring_num(self, index: int, num: int) -> None:
        self._request(F.SET_VRING_NUM, VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self._request(F.SET_VRING_BASE, VringState(index, base))

    def set_vring_addr(
        self,
        index: int,
        desc_user_addr: int,
        used_user_addr: int,
        avail_user_addr: int,
        *,
        log_guest_addr: int | None = None,
    ) -> None:
        """Ring addresses; ``log_guest_addr`` sets VHOST_VRING_F_LOG (and QEMU then waits)."""
        flags = VRING_ADDR_F_LOG if log_guest_addr is not None else 0
        payload = VringAddr(
            index, flags, desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr or 0
        )
        self._request(F.SET_VRING_ADDR, payload, sync=bool(flags))

    def get_vring_base(self, index: int) -> int:
        answer = self._request(F.GET_VRING_BASE, VringState(index, 0))
        assert answer is not None and isinstance(answer.payload, VringState)
        if answer.payload.index != index:
            raise ProtocolViolation(
                f"GET_VRING_BASE for ring {index} answered for ring {answer.payload.index}"
            )
        self.queue(index).stopped_base = answer.payload.num
        return answer.payload.num

    def _set_vring_file(self, code: FrontendRequest, index: int, fd: int | None) -> None:
        self._request(code, VringFile(index, fd is None), fds=[] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: FdChoice = OWN_FD) -> None:
        """``fd``: the queue's own eventfd (default), another fd, or None (the no-fd flag)."""
        self._set_vring_file(F.SET_VRING_KICK, index, _pick_fd(fd, self.queue(index).kick_fd))

    def set_vring_call(self, index: int, fd: FdChoice = OWN_FD) -> None:
        self._set_vring_file(F.SET_VRING_CALL, index, _pick_fd(fd, self.queue(index).call_fd))

    def set_vring_err(self, index: int, fd: FdChoice = OWN_FD) -> None:
        self._set_vring_file(F.SET_VRING_ERR, index, _pick_fd(fd, self.queue(index).err_fd))

    def set_vring_enable(self, index: int, enabled: bool) -> None:
        self._request(
            F.SET_VRING_ENABLE,
            VringState(index, int(enabled)),
            sync=self.profile.need_reply_on_vring_enable,
        )

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG as QEMU sends it (``size`` zero bytes in the request)."""
        answer = self._request(F.GET_CONFIG, ConfigSpace(offset, size, flags, bytes(size)))
        assert answer is not None and isinstance(answer.payload, ConfigSpace)
        got = answer.payload
        if got.size == 0 and size:
            raise BackendRefused(F.GET_CONFIG, None)
        if (got.offset, got.size) != (offset, size):
            raise ProtocolViolation(
                f"GET_CONFIG {offset}+{size} answered with {got.offset}+{got.size}"
            )
        return got.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self._request(F.SET_CONFIG, ConfigSpace(offset, len(data), flags, data), need_reply=True)

    def set_backend_req_fd(self) -> socket.socket:
        """Give the backend one end of a socketpair; the other is ``backend_channel``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._request(F.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=True)
        finally:
            theirs.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = ours
        self._backend_reader = MessageReader(BACKEND_LAYOUTS)
        return ours

    def read_backend_request(self, timeout: float | None = None) -> Message:
        """The next request on the backend-request channel (answer with ``answer_backend``)."""
        if self.backend_channel is None:
            raise FrontendError("no backend-request channel (call set_backend_req_fd)")
        message = self._receive(self.backend_channel, self._backend_reader, self._deadline(timeout))
        if message.is_reply:
            raise ProtocolViolation(f"a reply on the backend-request channel: {message}")
        self._log("received", message)
        return message

    def answer_backend(self, message: Message, result: int = 0) -> None:
        """Ack a backend request if it asked for one (``result`` 0 = success)."""
        if message.need_reply and self.backend_channel is not None:
            answer = reply(message.request, U64(result), backend_channel=True)
            self._log("sent", answer)
            data, _ = encode_message(answer)
            self._sendmsg(self.backend_channel, data, ())

    def set_status(self, status: int) -> None:
        self._request(F.SET_STATUS, U64(status), sync=True)

    def get_status(self) -> int:
        return self._u64_reply(F.GET_STATUS)

    def reset_device(self) -> None:
        self._request(F.RESET_DEVICE)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[InflightDescription, int]:
        """GET_INFLIGHT_FD: the backend's description and fd (owned by the caller)."""
        answer = self._request(F.GET_INFLIGHT_FD, InflightDescription(0, 0, num_queues, queue_size))
        assert answer is not None and isinstance(answer.payload, InflightDescription)
        if len(answer.fds) != 1:
            answer.close_fds()
            raise ProtocolViolation("GET_INFLIGHT_FD reply without its fd")
        return answer.payload, answer.fds[0]

    def set_inflight_fd(self, description: InflightDescription, fd: int) -> None:
        self._request(F.SET_INFLIGHT_FD, description, fds=[fd])

    # -- QEMU's sequences -------------------------------------------------------
    def supported_protocol_features(self) -> int:
        return self.profile.known_protocol_features & ~NEVER_NEGOTIATED

    def handshake(
        self, profile: str | None = None, *, num_queues: int = 1, config_size: int | None = None
    ) -> None:
        """QEMU's start-up (vhost_user_backend_init + vhost_dev_init + device realize).

        ``profile`` ("qemu-7.2" / "qemu-10.0") replaces the one given at construction.

        GET_FEATURES, [GET/SET_PROTOCOL_FEATURES, [GET_QUEUE_NUM], [GET_MAX_MEM_SLOTS],
        [SET_BACKEND_REQ_FD]], SET_OWNER, GET_FEATURES, per ring SET_VRING_CALL and
        SET_VRING_ERR, [GET_CONFIG of ``config_size`` bytes].
        """
        if profile is not None:
            self.profile = PROFILES[profile]
        self.get_features()
        if self.protocol_features_negotiated:
            offered = self.get_protocol_features()
            self.set_protocol_features(offered & self.supported_protocol_features())
            if self.has_protocol_feature(PF.MQ):
                self.get_queue_num()
            if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
                slots = self.get_max_mem_slots()
                if slots < len(self.ram.regions):
                    raise NotNegotiated(
                        f"backend has {slots} memory slots, guest RAM has {len(self.ram.regions)}"
                    )
            if self.has_protocol_feature(PF.BACKEND_REQ):
                self.set_backend_req_fd()
        max_queues = 1
        if self.has_protocol_feature(PF.MQ) and self.queue_num is not None:
            max_queues = self.queue_num
        if num_queues > max_queues:
            raise NotNegotiated(
                f"The maximum number of queues supported by the backend is {max_queues}"
            )
        self.set_owner()
        self.get_features()
        for index in range(num_queues):
            self.set_vring_call(index, self.queue(index).masked_call_fd)
            self.set_vring_err(index)
        if config_size is not None:
            if not self.has_protocol_feature(PF.CONFIG):
                raise NotNegotiated("the device needs GET_CONFIG: CONFIG protocol feature missing")
            self.config = self.get_config(0, config_size)

    def _add_status(self, bits: int) -> None:
        """QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS only if bits are missing."""
        status = self.get_status()
        if status & bits != bits:
            self.set_status(status | bits)

    def _set_features_and_status(self, features: int) -> None:
        """vhost_user_set_features: SET_FEATURES, then FEATURES_OK where STATUS is negotiated."""
        self.set_features(features)
        if self.has_protocol_feature(PF.STATUS):
            self._add_status(STATUS_FEATURES_OK)

    def sync_memory(self) -> None:
        """Send the memory table the way QEMU does at each device start.

        With slots (ADD/REM_MEM_REG) only the difference to what the backend
        has is sent, so a restart sends nothing; SET_MEM_TABLE is sent whole,
        every time (vhost_user_set_mem_table).
        """
        mode = self.memory_mode
        if mode == "auto":
            mode = "slots" if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS) else "table"
        if mode == "table":
            self.set_mem_table()
            return
        current = list(self.ram.regions)
        for region in [r for r in self._sent_regions if r not in current]:
            self.rem_mem_reg(region)
        for region in [r for r in current if r not in self._sent_regions]:
            self.add_mem_reg(region)

    def _configure_ring(self, index: int, ring: SplitRing, base: int) -> None:
        """vhost_virtqueue_start: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK."""
        self.set_vring_num(index, ring.size)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, ring.desc_user_addr, ring.used_user_addr, ring.avail_user_addr)
        self.set_vring_kick(index)

    def _new_ring(self, index: int, size: int, start_index: int = 0) -> SplitRing:
        queue = self.queue(index)
        if queue.ring is not None:
            queue.ring.release()
        event_idx = bool(self.acked_features & VirtioFeature.EVENT_IDX)
        queue.ring = SplitRing(self.ram, size, event_idx=event_idx, start_index=start_index)
        queue.stopped_base = None
        return queue.ring

    def start_device(self, queue_sizes: Sequence[int], driver_features: int) -> list[SplitRing]:
        """A driver bringing the device up (vhost_user_blk_start + vhost_dev_start).

        ``driver_features``: what the driver accepts; what is acked is that and
        what the backend offers (plus VHOST_USER_F_PROTOCOL_FEATURES, which QEMU
        always keeps). Sequence: SET_FEATURES (+FEATURES_OK), [GET/SET_INFLIGHT_FD],
        SET_VRING_CALL per ring (guest notifiers), SET_FEATURES again, memory,
        per ring NUM/BASE/ADDR/KICK, SET_VRING_ENABLE 1 per ring, [DRIVER_OK].
        """
        offered = self.offered_features or 0
        features = offered & driver_features
        features |= offered & VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES
        self._driver_features = driver_features
        self._started_sizes = list(queue_sizes)
        self._set_features_and_status(features)
        if self.has_protocol_feature(PF.INFLIGHT_SHMFD):
            if self.inflight is None:  # QEMU keeps the inflight area across restarts
                self.inflight = self.get_inflight_fd(len(queue_sizes), max(queue_sizes))
            self.set_inflight_fd(*self.inflight)
        for index in range(len(queue_sizes)):
            self.set_vring_call(index)
        self._set_features_and_status(features)
        self.sync_memory()
        rings = []
        for index, size in enumerate(queue_sizes):
            queue = self.queue(index)
            if queue.ring is None or queue.ring.size != size:
                self._new_ring(index, size)
            assert queue.ring is not None
            self._configure_ring(index, queue.ring, queue.ring.last_used_idx)
            rings.append(queue.ring)
        if self.protocol_features_negotiated:
            for index in range(len(queue_sizes)):
                self.set_vring_enable(index, True)
        if self.has_protocol_feature(PF.STATUS):
            self._add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
        return rings

    def stop_device(self) -> list[int]:
        """vhost_dev_stop: every ring disabled then stopped; returns the bases."""
        status = self.has_protocol_feature(PF.STATUS)
        if status and self.profile.status_reset_before_ring_stop:
            self.set_status(0)
        indices = range(len(self._started_sizes))
        if self.protocol_features_negotiated:
            for index in indices:
                self.set_vring_enable(index, False)
        bases = [self.get_vring_base(index) for index in indices]
        if status and not self.profile.status_reset_before_ring_stop:
            self.set_status(0)
        return bases

    def start_queue(
        self, index: int, size: int | None = None, *, base: int | None = None
    ) -> SplitRing:
        """(Re)start one ring: SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL, _ENABLE 1.

        Without ``size``, restarts the queue's existing ring from the base the
        last GET_VRING_BASE returned (kick and call are sent again: some
        backends, qemu-storage-daemon among them, close theirs on GET_VRING_BASE).
        """
        queue = self.queue(index)
        if size is not None and (queue.ring is None or queue.ring.size != size):
            self._new_ring(index, size)
        ring = queue.ring
        if ring is None:
            raise FrontendError(f"ring {index} has no size yet")
        if base is None:
            base = queue.stopped_base if queue.stopped_base is not None else ring.last_used_idx
        self._configure_ring(index, ring, base)
        self.set_vring_call(index)
        if self.protocol_features_negotiated:
            self.set_vring_enable(index, True)
        queue.stopped_base = None
        return ring

    def stop_queue(self, index: int) -> int:
        """SET_VRING_ENABLE 0 (when negotiated), then GET_VRING_BASE: the base to resume from."""
        if self.protocol_features_negotiated:
            self.set_vring_enable(index, False)
        return self.get_vring_base(index)

    def reboot(self) -> None:
        """What a guest reboot makes QEMU send: stop, [RESET_DEVICE], start with fresh rings.

        The memory table is not resent when slots are used (QEMU diffs it);
        SET_MEM_TABLE is, as QEMU sends it at every start.
        """
        if not self._started_sizes:
            raise FrontendError("the device was never started")
        self.stop_device()
        if self.has_protocol_feature(PF.RESET_DEVICE):
            self.reset_device()
        for index in range(len(self._started_sizes)):
            ring = self.queue(index).ring
            assert ring is not None
            ring.reset()  # the rebooted driver allocates zeroed rings
            self.queue(index).stopped_base = None
        self.start_device(self._started_sizes, self._driver_features)

    def kick(self, index: int) -> None:
        self.queue(index).kick()

    def rings(self) -> Iterable[SplitRing]:
        return (q.ring for q in self.queues.values() if q.ring is not None)
