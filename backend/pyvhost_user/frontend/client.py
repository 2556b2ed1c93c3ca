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

IOMMU mode (``iommu=Iommu(...)``): ACCESS_PLATFORM is acked when offered,
rings and descriptors carry IOVAs, and a background ``MissResponder`` answers
the back-end's BACKEND_IOTLB_MSG misses the way QEMU's
``vhost_device_iotlb_miss`` does. Two threads then use the main channel: every
request/reply exchange holds ``exchange()`` (a lock), so a reply is always
read by the thread that asked for it. A test that ``send``s and ``receive``s by
hand while the responder runs holds ``with fe.exchange():`` around the pair.

The pyvhost-user extension (``extension=True``, ``persist=True``): address
spaces, groups, IOTLB messages with an ASID, batches, RESET_MAP, and IOTLB
persistence across device resets; negotiated only when asked and offered, so
the default front-end is a stock QEMU.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..wire import (
    BACKEND_LAYOUTS,
    DEVICE_STATE_REPLY_ERROR_MASK,
    DEVICE_STATE_REPLY_NO_FD,
    FRONTEND_LAYOUTS,
    NEED_DATA,
    AsidIotlbMsg,
    BackendRequest,
    ConfigSpace,
    DeviceStateDirection,
    DeviceStatePhase,
    DeviceStateTransfer,
    FrontendRequest,
    InflightDescription,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    ProtocolFeature,
    SingleMemRegion,
    U64,
    VendorProtocolFeature,
    VendorRequest,
    VirtioFeature,
    VringAddr,
    VringFile,
    VringState,
    WireError,
    close_all,
    encode_message,
    reply,
    request,
    request_name,
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
from .guest_ram import PAGE_SIZE, GuestRam, RamRegion
from .iommu import Iommu, IommuFault, IommuMode
from .packed_ring import PackedRing
from .split_ring import SplitRing

F = FrontendRequest
PF = ProtocolFeature
VPF = VendorProtocolFeature
VR = VendorRequest
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


def _wait_fd(fd: int, events: int, deadline: float, what: str) -> None:
    """Until ``fd`` is ready for ``events`` (or hung up, or in error: then the read or
    write that follows says so), else ``FrontendTimeout``."""
    poller = select.poll()
    poller.register(fd, events)
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poller.poll(remaining * 1000):
        raise FrontendTimeout(f"the back-end did not {what} in time")


def _read_to_end(fd: int, deadline: float) -> bytes:
    """Everything until end of file (the back-end closing its end)."""
    data = bytearray()
    while True:
        _wait_fd(fd, select.POLLIN, deadline, "write its state to the end")
        chunk = os.read(fd, RECV_SIZE)
        if not chunk:
            return bytes(data)
        data += chunk


def _write_all(fd: int, data: memoryview, deadline: float) -> None:
    """Write ``data``; stop quietly if the back-end closed its end (its CHECK_DEVICE_STATE
    answer says why)."""
    os.set_blocking(fd, False)
    done = 0
    while done < len(data):
        _wait_fd(fd, select.POLLOUT, deadline, "read the state")
        try:
            done += os.write(fd, data[done : done + RECV_SIZE])
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return


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
    ring: SplitRing | PackedRing | None = None
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

    ``ram`` is the guest RAM to offer (created, and then owned, if None; the
    IOMMU's when an ``Iommu`` is given).
    ``iommu``: an ``Iommu`` or a mode ("offset", "shuffle") to build one over
    ``ram``: IOVAs instead of gpas, ACCESS_PLATFORM acked, misses answered by
    a background ``MissResponder``. ``premap``: UPDATE the whole table at each
    start (skipping what the back-end is known to hold). ``extension`` /
    ``persist``: negotiate vendor bits 48 / 49 when offered. ``prefetch_used``:
    UPDATE each used ring's page after DRIVER_OK as QEMU does (default: only
    without the extension).
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
        iommu: Iommu | IommuMode | None = None,
        extension: bool = False,
        persist: bool = False,
        premap: bool = False,
        respond_to_misses: bool = True,
        prefetch_used: bool | None = None,
    ) -> None:
        if isinstance(iommu, Iommu) and ram is None:
            ram = iommu.ram  # the IOMMU's RAM; its owner closes it
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
        # One request/reply exchange at a time on the main channel (the miss
        # responder sends UPDATEs from its own thread).
        self._lock = threading.RLock()
        # -- IOMMU and the address-space extension --
        self.want_extension = extension
        self.want_persist = persist
        self.premap = premap
        self.respond_to_misses = respond_to_misses
        # QEMU sends the used ring's page unasked at each start (vhost_dev_start);
        # a front-end that relies on IOTLB persistence does not.
        self.prefetch_used = (not extension) if prefetch_used is None else prefetch_used
        if isinstance(iommu, str):
            iommu = Iommu(self.ram, mode=iommu)
        self.iommus: dict[int, Iommu] = {} if iommu is None else {0: iommu}
        self.group_asid: dict[int, int] = {}  # group -> asid, as set by set_group_asid
        self.ring_group: dict[int, int] = {}  # ring -> group, as GET_VRING_GROUP said
        # What the back-end holds, as far as the front-end knows: asid -> [(iova, size)].
        self.sent_mappings: dict[int, list[tuple[int, int]]] = {}
        self.iotlb_counters: Counter[str] = Counter()
        self.responder: MissResponder | None = None

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
        self.stop_miss_responder()
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
                f"reply to {request_name(code)} carries request code {message.request}"
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
        with self._lock:
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

    def exchange(self) -> threading.RLock:
        """Hold this around a hand-made send/receive pair (``with fe.exchange(): ...``)."""
        return self._lock

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
        self._device_was_reset()

    def get_queue_num(self) -> int:
        self.queue_num = self._u64_reply(F.GET_QUEUE_NUM)
        return self.queue_num

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: the MAC in the first 6 bytes of the u64 (as QEMU
        sends it after a migration, for a guest without GUEST_ANNOUNCE)."""
        self._request(F.SEND_RARP, U64(int.from_bytes(bytes(mac).ljust(8, b"\0"), "little")),
                      need_reply=True)

    def net_set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU (QEMU sends it with NEED_REPLY)."""
        self._request(F.NET_SET_MTU, U64(mtu), need_reply=True)

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
        if status == 0:
            self._device_was_reset()

    def get_status(self) -> int:
        return self._u64_reply(F.GET_STATUS)

    def reset_device(self, *, sync: bool = False) -> None:
        """RESET_DEVICE, sent as QEMU does (no reply awaited); ``sync``: wait until the
        back-end has done it (NEED_REPLY, or GET_FEATURES after it), to time it."""
        self._request(F.RESET_DEVICE, sync=sync)
        self._device_was_reset()

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

    # -- device state (live migration, vhost-user.rst "Migrating back-end state") ------
    def set_device_state_fd(
        self, direction: DeviceStateDirection, fd: int,
        phase: DeviceStatePhase = DeviceStatePhase.STOPPED,
    ) -> int | None:
        """SET_DEVICE_STATE_FD with ``fd`` (sent, not closed: the caller's). Returns the
        back-end's own channel when it gives one (then it must be used instead), else
        None; ``BackendRefused`` when bits 0-7 of the reply are not 0."""
        answer = self._request(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(direction, phase),
                               fds=[fd])
        assert answer is not None and isinstance(answer.payload, U64)
        value = answer.payload.value
        if value & DEVICE_STATE_REPLY_ERROR_MASK:
            answer.close_fds()
            raise BackendRefused(F.SET_DEVICE_STATE_FD, value)
        if value & DEVICE_STATE_REPLY_NO_FD:
            return None
        return answer.fds[0]  # the codec let exactly one through

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: 0 when the back-end says the transfer succeeded."""
        return self._u64_reply(F.CHECK_DEVICE_STATE)

    def suspend_device(self) -> list[int]:
        """Every ring disabled and stopped, with no device reset after (no SET_STATUS 0,
        no RESET_DEVICE): the suspended device whose state can be saved. Unlike
        ``stop_device``, groups stay bound to their ASIDs (a reset binds all to 0)."""
        indices = range(len(self._started_sizes))
        if self.protocol_features_negotiated:
            for index in indices:
                self.set_vring_enable(index, False)
        return [self.get_vring_base(index) for index in indices]

    def save_device_state(self) -> bytes:
        """QEMU's vhost_save_backend_state: a pipe, SET_DEVICE_STATE_FD (save) with its
        write end, read to end of file, CHECK_DEVICE_STATE. Returns the state;
        ``BackendRefused`` when either request fails."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                theirs = self.set_device_state_fd(DeviceStateDirection.SAVE, write_end)
            finally:
                os.close(write_end)  # ours must go, or the back-end's close is no end of file
            if theirs is not None:
                os.close(read_end)
                read_end = theirs
            data = _read_to_end(read_end, self._deadline(None))
        finally:
            os.close(read_end)
        self._check_state_transfer()
        return data

    def load_device_state(self, data: bytes | bytearray | memoryview) -> None:
        """QEMU's vhost_load_backend_state: a pipe, SET_DEVICE_STATE_FD (load) with its
        read end, ``data`` written and the write end closed, CHECK_DEVICE_STATE.
        ``BackendRefused`` when the back-end refuses the channel or the state."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            theirs = self.set_device_state_fd(DeviceStateDirection.LOAD, read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        if theirs is not None:
            os.close(write_end)
            write_end = theirs
        try:
            _write_all(write_end, memoryview(data).cast("B"), self._deadline(None))
        finally:
            os.close(write_end)  # the end of file the back-end reads up to
        self._check_state_transfer()

    def _check_state_transfer(self) -> None:
        result = self.check_device_state()
        if result != 0:
            raise BackendRefused(F.CHECK_DEVICE_STATE, result)

    def adopt_address_spaces(self, source: Frontend) -> None:
        """After loading ``source``'s back-end state into ours: what the VMM migrates of
        its own (group bindings, rings' groups, what the back-end holds), so that rings
        use the right ASID and nothing is mapped twice. IOMMUs are attached apart:
        they belong to each side's guest RAM."""
        self.group_asid = dict(source.group_asid)
        self.ring_group = dict(source.ring_group)
        self.sent_mappings = {asid: list(m) for asid, m in source.sent_mappings.items()}

    # -- QEMU's sequences -------------------------------------------------------
    def supported_protocol_features(self) -> int:
        known = self.profile.known_protocol_features & ~NEVER_NEGOTIATED
        if self.want_extension:
            known |= VPF.ADDRESS_SPACES
        if self.want_persist:
            known |= VPF.IOTLB_PERSIST
        return known

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
                if self.iommus and self.respond_to_misses:
                    self.start_miss_responder()
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
        if self.iommus:
            ring.iommu = self.iommu_of_asid(self.asid_of_ring(index))
        self.set_vring_num(index, ring.size)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, ring.desc_user_addr, ring.used_user_addr, ring.avail_user_addr)
        self.set_vring_kick(index)

    def _new_ring(self, index: int, size: int, start_index: int = 0) -> SplitRing | PackedRing:
        queue = self.queue(index)
        if queue.ring is not None:
            queue.ring.release()
        event_idx = bool(self.acked_features & VirtioFeature.EVENT_IDX)
        iommu = self.iommu_of_asid(self.asid_of_ring(index)) if self.iommus else None
        layout = PackedRing if self.acked_features & VirtioFeature.RING_PACKED else SplitRing
        queue.ring = layout(
            self.ram, size, event_idx=event_idx, start_index=start_index, iommu=iommu
        )
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
        if self.iommus:
            if not offered & VirtioFeature.ACCESS_PLATFORM:
                raise NotNegotiated("IOMMU mode needs VIRTIO_F_ACCESS_PLATFORM (not offered)")
            driver_features |= VirtioFeature.ACCESS_PLATFORM
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
        if self.iommus and self.premap:
            self.premap_iommu()
        rings = []
        for index, size in enumerate(queue_sizes):
            queue = self.queue(index)
            packed = bool(features & VirtioFeature.RING_PACKED)
            if queue.ring is None or queue.ring.size != size or (
                    isinstance(queue.ring, PackedRing) != packed):
                self._new_ring(index, size)
            assert queue.ring is not None
            self._configure_ring(index, queue.ring, queue.ring.start_base)
            rings.append(queue.ring)
        if self.protocol_features_negotiated:
            for index in range(len(queue_sizes)):
                self.set_vring_enable(index, True)
        if self.has_protocol_feature(PF.STATUS):
            self._add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
        if self.access_platform and self.prefetch_used:
            # vhost_dev_start: "Update used ring information for IOTLB to work correctly"
            for index, ring in enumerate(rings):
                asid = self.asid_of_ring(index)
                if not self.backend_has(asid, ring.used_user_addr):
                    self.answer_miss(ring.used_user_addr, asid=asid, write=True)
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
            base = queue.stopped_base if queue.stopped_base is not None else ring.start_base
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

    def reboot(self, before_start: Callable[[], None] | None = None) -> None:
        """What a guest reboot makes QEMU send: stop, [RESET_DEVICE], start with fresh rings.

        The memory table is not resent when slots are used (QEMU diffs it);
        SET_MEM_TABLE is, as QEMU sends it at every start. ``before_start`` runs
        between the reset and the start (e.g. binding a group to an ASID, which
        a device reset undoes and running rings forbid).
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
        if before_start is not None:
            before_start()
        self.start_device(self._started_sizes, self._driver_features)

    def kick(self, index: int) -> None:
        self.queue(index).kick()

    def rings(self) -> Iterable[SplitRing]:
        return (q.ring for q in self.queues.values() if q.ring is not None)

    # -- IOMMU (VIRTIO_F_ACCESS_PLATFORM) ---------------------------------------------
    @property
    def iommu(self) -> Iommu | None:
        """The guest IOMMU of ASID 0 (the one a stock QEMU has)."""
        return self.iommus.get(0)

    @property
    def access_platform(self) -> bool:
        return bool(self.acked_features & VirtioFeature.ACCESS_PLATFORM)

    @property
    def extension(self) -> bool:
        """The address-space extension (vendor bit 48) was negotiated."""
        return self.has_protocol_feature(VPF.ADDRESS_SPACES)

    @property
    def persist(self) -> bool:
        """IOTLB persistence (vendor bit 49) was negotiated."""
        return self.has_protocol_feature(VPF.IOTLB_PERSIST)

    def attach_iommu(self, asid: int, iommu: Iommu) -> None:
        """The page table behind ``asid``; rings bound to it pick it up at their next start."""
        self.iommus[asid] = iommu

    def iommu_of_asid(self, asid: int) -> Iommu:
        try:
            return self.iommus[asid]
        except KeyError:
            raise FrontendError(f"no IOMMU attached for ASID {asid}") from None

    def asid_of_ring(self, index: int) -> int:
        return self.group_asid.get(self.ring_group.get(index, 0), 0)

    def _device_was_reset(self) -> None:
        """Every group goes back to ASID 0; without persistence the back-end's IOTLBs
        go back to their defaults (what the kernel and our back-end do)."""
        self.group_asid.clear()
        if not self.persist:
            self.sent_mappings.clear()

    @property
    def iotlb_messages_sent(self) -> int:
        """IOTLB UPDATEs and INVALIDATEs sent so far (with or without an ASID)."""
        return self.iotlb_counters["update"] + self.iotlb_counters["invalidate"]

    def backend_has(self, asid: int, iova: int, length: int = 1) -> bool:
        """Whether an UPDATE this front-end sent (and nothing removed since) covers the range."""
        return any(
            start <= iova and iova + length <= start + size
            for start, size in self.sent_mappings.get(asid, [])
        )

    def _forget_overlapping(self, asid: int, iova: int, size: int) -> None:
        last = (iova + size - 1) & ((1 << 64) - 1)
        if last < iova:
            return
        self.sent_mappings[asid] = [
            (start, length)
            for start, length in self.sent_mappings.get(asid, [])
            if start + length - 1 < iova or start > last
        ]

    def answer_miss(self, iova: int, *, asid: int | None = None, write: bool = False) -> bool:
        """QEMU's vhost_device_iotlb_miss: UPDATE the page holding ``iova`` (target: the
        front-end user address of its gpa, permission: the page's), or nothing when the
        IOVA is unmapped. True if an UPDATE was sent."""
        if asid is None:
            asid = self.asid_of_ring(0)
        iommu = self.iommus.get(asid)
        try:
            if iommu is None:
                raise IommuFault(f"no IOMMU for ASID {asid}")
            gpa, perm = iommu.lookup_page(iova)
        except IommuFault:
            self.iotlb_counters["miss_unmapped"] += 1
            return False
        page = iova & ~(PAGE_SIZE - 1)
        self.iotlb_update(asid, page, PAGE_SIZE, self.ram.uva(gpa, PAGE_SIZE), perm)
        return True

    def premap_iommu(self, asid: int = 0) -> int:
        """Send an UPDATE for every entry of ``asid``'s page table the back-end lacks
        (in one batch when the extension is negotiated); returns how many."""
        iommu = self.iommu_of_asid(asid)
        wanted = [e for e in iommu.entries() if not self.backend_has(asid, e.iova, e.size)]
        if not wanted:
            return 0
        batch = self.iotlb_batch() if self.extension else contextlib.nullcontext()
        with batch:
            for entry in wanted:
                self.iotlb_update(
                    asid, entry.iova, entry.size, self.ram.uva(entry.gpa, entry.size), entry.perm
                )
        return len(wanted)

    def iommu_unmap(self, iova: int, size: int, *, asid: int = 0, invalidate: bool = True) -> None:
        """The guest unmaps ``[iova, iova+size)``; QEMU's unmap notifier sends INVALIDATE."""
        self.iommu_of_asid(asid).unmap(iova, size)
        if invalidate:
            self.iotlb_invalidate(asid, iova, size)

    def start_miss_responder(self) -> MissResponder:
        if self.backend_channel is None:
            raise FrontendError("no backend-request channel to answer misses on")
        self.stop_miss_responder()
        self.responder = MissResponder(self)
        self.responder.start()
        return self.responder

    def stop_miss_responder(self) -> None:
        if self.responder is not None:
            self.responder.stop()
            self.responder = None

    # -- the pyvhost-user extension (docs/vhost-user-asid-extension.rst) ---------------
    def _need_extension(self, what: str) -> None:
        if not self.extension:
            raise NotNegotiated(f"{what} needs the ADDRESS_SPACES extension (vendor bit 48)")

    def get_num_asids(self) -> int:
        self._need_extension("GET_NUM_ASIDS")
        return self._u64_reply(VR.GET_NUM_ASIDS)  # type: ignore[arg-type]

    def get_vring_group(self, index: int) -> int:
        self._need_extension("GET_VRING_GROUP")
        answer = self._request(VR.GET_VRING_GROUP, VringState(index, 0))  # type: ignore[arg-type]
        assert answer is not None and isinstance(answer.payload, VringState)
        if answer.payload.index != index:
            raise ProtocolViolation(
                f"GET_VRING_GROUP for ring {index} answered for ring {answer.payload.index}"
            )
        self.ring_group[index] = answer.payload.num
        return answer.payload.num

    def set_group_asid(self, group: int, asid: int) -> None:
        self._need_extension("SET_GROUP_ASID")
        self._request(VR.SET_GROUP_ASID, VringState(group, asid), need_reply=True)  # type: ignore[arg-type]
        self.group_asid[group] = asid

    def _iotlb_message(self, asid: int, msg: IotlbMsg) -> None:
        """IOTLB_MSG (ASID 0, stock) or IOTLB_MSG_ASID; with REPLY_ACK, NEED_REPLY is set
        and a non-zero ack raises ``BackendRefused`` (QEMU's vhost_user_send_device_iotlb_msg)."""
        code: int
        payload: Payload
        if self.extension:
            code, payload = VR.IOTLB_MSG_ASID, AsidIotlbMsg(asid, msg)
        elif asid != 0:
            raise NotNegotiated(f"ASID {asid} needs the ADDRESS_SPACES extension")
        else:
            code, payload = F.IOTLB_MSG, msg
        with self._lock:
            self.send(request(code, payload, need_reply=self.reply_ack))
            if not self.reply_ack:
                return
            answer = self.receive_reply(code)
        assert isinstance(answer.payload, U64)
        if answer.payload.value != 0:
            raise BackendRefused(code, answer.payload.value)

    def iotlb_update(
        self, asid: int, iova: int, size: int, uaddr: int, perm: int = IotlbPerm.RW
    ) -> None:
        """IOTLB UPDATE (IOTLB_MSG_ASID with the extension, else the stock IOTLB_MSG for
        ASID 0); waits for the ack when REPLY_ACK is negotiated (``BackendRefused``)."""
        self.iotlb_counters["update"] += 1
        try:
            self._iotlb_message(
                asid, IotlbMsg(iova, size, uaddr, IotlbPerm(perm), IotlbType.UPDATE)
            )
        except BackendRefused:
            self.iotlb_counters["refused"] += 1
            raise
        self.sent_mappings.setdefault(asid, []).append((iova, size))

    def iotlb_invalidate(self, asid: int, iova: int, size: int) -> None:
        """IOTLB INVALIDATE; ``iova=0, size=0`` is "everything", as in the kernel."""
        self.iotlb_counters["invalidate"] += 1
        try:
            self._iotlb_message(asid, IotlbMsg(iova, size, 0, IotlbPerm.NONE, IotlbType.INVALIDATE))
        except BackendRefused:
            self.iotlb_counters["refused"] += 1
            raise
        self._forget_overlapping(asid, iova, size)

    @contextlib.contextmanager
    def iotlb_batch(self) -> Iterator[None]:
        """IOTLB_BATCH_BEGIN ... IOTLB_BATCH_END; the main channel is held throughout."""
        self._need_extension("IOTLB_BATCH_BEGIN")
        with self._lock:
            self.iotlb_counters["batch_begin"] += 1
            self._request(VR.IOTLB_BATCH_BEGIN, need_reply=True)  # type: ignore[arg-type]
            try:
                yield
            finally:
                self.iotlb_counters["batch_end"] += 1
                self._request(VR.IOTLB_BATCH_END, need_reply=True)  # type: ignore[arg-type]

    def reset_map(self, asid: int) -> None:
        """RESET_MAP: ``asid`` back to its default mapping (identity or empty)."""
        self._need_extension("RESET_MAP")
        self.iotlb_counters["reset_map"] += 1
        self._request(VR.RESET_MAP, U64(asid), need_reply=True)  # type: ignore[arg-type]
        self.sent_mappings.pop(asid, None)


class MissResponder:
    """A thread answering BACKEND_IOTLB_MSG MISS like QEMU (``Frontend.answer_miss``).

    Misses are recorded in ``misses`` as ``(iova, perm, answered)``; anything
    unexpected lands in ``errors`` (``check()`` raises on it). Other back-end
    requests are acked with a failure when they ask for a reply.
    """

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.misses: list[tuple[int, int, bool]] = []
        self.errors: list[str] = []
        self.access_failures: list[tuple[int, int]] = []
        self._access_fail_cond = threading.Condition()
        self.other_requests: list[str] = []
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="iotlb-miss-responder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            os.eventfd_write(self._wake, 1)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.errors.append("the miss responder did not stop")
                return
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    def check(self) -> None:
        if self.errors:
            raise FrontendError("IOTLB miss responder: " + "; ".join(self.errors))

    def _run(self) -> None:
        fe = self.frontend
        channel = fe.backend_channel
        assert channel is not None
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while True:
            if not fe._backend_reader.buffered_bytes:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake in ready:
                    return
            try:
                message = fe.read_backend_request()
            except BackendClosed:
                return
            except FrontendError as exc:
                if self._wake in {fd for fd, _ in poller.poll(0)}:
                    return
                self.errors.append(f"reading the backend channel: {exc}")
                return
            try:
                self._handle(message)
            except BackendClosed:
                return
            except FrontendError as exc:
                self.errors.append(f"answering {message}: {exc}")

    def wait_access_failures(self, count: int, timeout: float) -> None:
        """Wait until ``count`` ACCESS_FAIL messages arrived (FrontendTimeout otherwise)."""
        with self._access_fail_cond:
            if not self._access_fail_cond.wait_for(
                lambda: len(self.access_failures) >= count, timeout=timeout
            ):
                raise FrontendTimeout(
                    f"{len(self.access_failures)} ACCESS_FAIL message(s), expected {count}"
                )

    def _handle(self, message: Message) -> None:
        fe = self.frontend
        payload = message.payload
        if (
            message.request == BackendRequest.IOTLB_MSG
            and isinstance(payload, IotlbMsg)
            and payload.type == IotlbType.MISS
        ):
            fe.iotlb_counters["miss_received"] += 1
            answered = False
            try:
                answered = fe.answer_miss(payload.iova, write=bool(payload.perm & IotlbPerm.WO))
            finally:
                self.misses.append((payload.iova, int(payload.perm), answered))
            fe.answer_backend(message, 0)
            return
        if (
            message.request == BackendRequest.IOTLB_MSG
            and isinstance(payload, IotlbMsg)
            and payload.type == IotlbType.ACCESS_FAIL
        ):
            # QEMU only logs these; the model records them for tests.
            fe.iotlb_counters["access_fail_received"] += 1
            with self._access_fail_cond:
                self.access_failures.append((payload.iova, int(payload.perm)))
                self._access_fail_cond.notify_all()
            fe.answer_backend(message, 0)
            return
        self.other_requests.append(str(message))
        message.close_fds()
        fe.answer_backend(message, 1)
