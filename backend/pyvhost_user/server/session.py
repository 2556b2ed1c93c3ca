"""One front-end connection: every protocol check, and the device life cycle.

``Session.handle(message)`` takes a decoded request and returns the replies
to send. Every gate runs before a handler: the request is allowed by what
was negotiated, the owner is set, the ring index exists, the ring is in a
state where the change is allowed. A refused request leaves the state as it
was and is answered with a failure when an answer is expected.

Life cycle, as QEMU 7.2 and 10.0 drive it: rings start on SET_VRING_KICK
and stop on GET_VRING_BASE; a device reset (SET_STATUS 0, RESET_DEVICE,
RESET_OWNER) stops every ring but keeps the memory table, because QEMU does
not send it again after a guest reboot.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..devices.base import Device, DeviceError
from ..memory import BadMemoryRegion, DirectSpace, GuestMemory, map_region
from ..virtqueue import InvalidQueueConfig, QueueConfig, SplitQueue, signal_eventfd
from ..wire import (
    U64,
    ConfigSpace,
    FrontendRequest as R,
    MemTable,
    Message,
    ProtocolFeature as PF,
    SingleMemRegion,
    VirtioFeature as VF,
    VringAddr,
    VringFile,
    VringState,
    ack,
    close_all,
    reply,
)
from .queue_worker import QueueWorker

log = logging.getLogger(__name__)

MAX_MEM_SLOTS = 32
MAX_QUEUE_SIZE = 1024

TRANSPORT_FEATURES = int(
    VF.VERSION_1 | VF.INDIRECT_DESC | VF.EVENT_IDX | VF.VHOST_USER_F_PROTOCOL_FEATURES
)
PROTOCOL_FEATURES = int(
    PF.MQ
    | PF.REPLY_ACK
    | PF.BACKEND_REQ
    | PF.CONFIG
    | PF.RESET_DEVICE
    | PF.CONFIGURE_MEM_SLOTS
    | PF.STATUS
)

# virtio device status bits
STATUS_DRIVER_OK = 0x04
STATUS_NEEDS_RESET = 0x40

# Requests a front-end may only send once a protocol feature was acked.
REQUIRED_PROTOCOL_FEATURE: dict[int, PF] = {
    R.GET_QUEUE_NUM: PF.MQ,
    R.GET_CONFIG: PF.CONFIG,
    R.SET_CONFIG: PF.CONFIG,
    R.GET_MAX_MEM_SLOTS: PF.CONFIGURE_MEM_SLOTS,
    R.ADD_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
    R.REM_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
    R.RESET_DEVICE: PF.RESET_DEVICE,
    R.SET_STATUS: PF.STATUS,
    R.GET_STATUS: PF.STATUS,
    R.SET_BACKEND_REQ_FD: PF.BACKEND_REQ,
    R.SET_LOG_BASE: PF.LOG_SHMFD,
    R.SET_LOG_FD: PF.LOG_SHMFD,
    R.GET_INFLIGHT_FD: PF.INFLIGHT_SHMFD,
    R.SET_INFLIGHT_FD: PF.INFLIGHT_SHMFD,
    R.SEND_RARP: PF.RARP,
    R.NET_SET_MTU: PF.NET_MTU,
    R.SET_VRING_ENDIAN: PF.CROSS_ENDIAN,
    R.VRING_KICK: PF.INBAND_NOTIFICATIONS,
    R.SET_DEVICE_STATE_FD: PF.DEVICE_STATE,
    R.CHECK_DEVICE_STATE: PF.DEVICE_STATE,
}
# Requests that need the owner set first (QEMU sends SET_OWNER before them).
NEEDS_OWNER = frozenset(
    {
        R.SET_FEATURES,
        R.SET_MEM_TABLE,
        R.ADD_MEM_REG,
        R.REM_MEM_REG,
        R.SET_VRING_NUM,
        R.SET_VRING_ADDR,
        R.SET_VRING_BASE,
        R.GET_VRING_BASE,
        R.SET_VRING_KICK,
        R.SET_VRING_CALL,
        R.SET_VRING_ERR,
        R.SET_VRING_ENABLE,
    }
)
# Requests whose answer is a payload of their own (not a REPLY_ACK u64).
HAS_REPLY = frozenset(
    {
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.GET_VRING_BASE,
        R.GET_CONFIG,
        R.GET_STATUS,
    }
)


class Refused(Exception):
    """A request the session will not carry out; the state is unchanged."""

    def __init__(self, request: int, reason: str) -> None:
        super().__init__(reason)
        self.request = request
        self.reason = reason


class Disconnect(Exception):
    """The connection must be dropped (the front-end waits for an answer we cannot give)."""


@dataclass
class Ring:
    config: QueueConfig
    call_lock: threading.Lock = field(default_factory=threading.Lock)
    worker: QueueWorker | None = None
    broken_reason: str | None = None

    @property
    def started(self) -> bool:
        return self.worker is not None


class Session:
    """The state of one front-end connection, and the dispatcher of its requests."""

    def __init__(self, device: Device, memory: GuestMemory | None = None) -> None:
        self.device = device
        self.memory = memory or GuestMemory(max_regions=MAX_MEM_SLOTS)
        self.offered_features = TRANSPORT_FEATURES | device.device_features
        self.offered_protocol_features = PROTOCOL_FEATURES
        self.acked_features = 0
        self.features_set = False
        self.acked_protocol_features = 0
        self.owner = False
        self.status = 0
        self.backend_channel_fd: int | None = None
        self.rings = [Ring(QueueConfig(i)) for i in range(device.num_queues)]
        self.counters: dict[str, int] = {"requests": 0, "refused": 0, "device_resets": 0}
        self._handlers: dict[int, Callable[[Message], Message | None]] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.RESET_DEVICE: self._reset_device,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
        }

    # -- entry point -----------------------------------------------------------
    def handle(self, message: Message) -> list[Message]:
        """Carry out one request; return the replies to send (maybe none)."""
        self.counters["requests"] += 1
        code = message.request
        try:
            self._check_gates(message)
            handler = self._handlers.get(code)
            if handler is None:
                raise Refused(code, "request not supported by this back-end")
            answer = handler(message)
        except Refused as exc:
            message.close_fds()
            self.counters["refused"] += 1
            log.warning("refused %s: %s", _name(code), exc.reason)
            return self._refusal(message)
        if answer is not None:
            return [answer]
        if message.need_reply:
            return [ack(code, True)]
        return []

    def _refusal(self, message: Message) -> list[Message]:
        code = message.request
        if code == R.GET_CONFIG:
            # vhost-user.rst: a zero-length payload tells the front-end it failed.
            assert isinstance(message.payload, ConfigSpace)
            p = message.payload
            return [reply(code, ConfigSpace(p.offset, 0, p.flags, b""))]
        if code in HAS_REPLY:
            raise Disconnect(
                f"{_name(code)} was refused and the front-end waits for its value: "
                "closing the connection rather than answer with a made-up one"
            )
        if message.need_reply:
            return [ack(code, False)]
        return []

    def refuse_malformed(self, code: int, need_reply: bool) -> list[Message]:
        """Answer a message the wire layer could not decode (its bytes were consumed)."""
        self.counters["refused"] += 1
        if code in HAS_REPLY or code == R.GET_CONFIG:
            raise Disconnect(f"malformed {_name(code)}: the front-end waits for a reply")
        return [ack(code, False)] if need_reply else []

    def _check_gates(self, message: Message) -> None:
        code = message.request
        needed = REQUIRED_PROTOCOL_FEATURE.get(code)
        if needed is not None and not self.acked_protocol_features & needed:
            raise Refused(code, f"needs protocol feature {needed.name}, not negotiated")
        if code in NEEDS_OWNER and not self.owner:
            raise Refused(code, "SET_OWNER has not been sent")
        payload = message.payload
        if isinstance(payload, (VringState, VringAddr, VringFile)):
            if payload.index >= len(self.rings):
                raise Refused(code, f"ring index {payload.index} >= {len(self.rings)} rings")

    # -- features and ownership ------------------------------------------------
    def _get_features(self, m: Message) -> Message:
        return reply(m.request, U64(self.offered_features))

    def _set_features(self, m: Message) -> None:
        assert isinstance(m.payload, U64)
        features = m.payload.value
        unknown = features & ~self.offered_features
        if unknown:
            raise Refused(m.request, f"features {unknown:#x} were not offered")
        self.acked_features = features
        self.features_set = True
        self.device.set_features(features)
        log.info("features acked: %#x", features)

    def _get_protocol_features(self, m: Message) -> Message:
        return reply(m.request, U64(self.offered_protocol_features))

    def _set_protocol_features(self, m: Message) -> None:
        assert isinstance(m.payload, U64)
        unknown = m.payload.value & ~self.offered_protocol_features
        if unknown:
            raise Refused(m.request, f"protocol features {unknown:#x} were not offered")
        self.acked_protocol_features = m.payload.value
        log.info("protocol features acked: %s", PF(m.payload.value))

    def _set_owner(self, m: Message) -> None:
        self.owner = True

    def _reset_owner(self, m: Message) -> None:
        # Deprecated; vhost-user.rst recommends treating it as "disable all rings".
        self.device_reset("RESET_OWNER")

    def _get_queue_num(self, m: Message) -> Message:
        return reply(m.request, U64(len(self.rings)))

    # -- memory ----------------------------------------------------------------
    def _get_max_mem_slots(self, m: Message) -> Message:
        return reply(m.request, U64(MAX_MEM_SLOTS))

    def _set_mem_table(self, m: Message) -> None:
        assert isinstance(m.payload, MemTable)
        table = GuestMemory(max_regions=MAX_MEM_SLOTS)
        try:
            for region, fd in zip(m.payload.regions, m.fds, strict=True):
                table.add(
                    map_region(
                        fd,
                        region.guest_phys_addr,
                        region.size,
                        region.user_addr,
                        region.mmap_offset,
                    )
                )
        except BadMemoryRegion as exc:
            raise Refused(m.request, str(exc)) from None
        finally:
            m.close_fds()  # mapped regions keep the memory; the fds are not needed
        self.memory.clear()
        for region in table.regions:
            self.memory.add(region)
        for region in self.memory.regions:
            log.info("memory region: %s", region.describe())

    def _add_mem_reg(self, m: Message) -> None:
        assert isinstance(m.payload, SingleMemRegion)
        region = m.payload.region
        try:
            mapped = map_region(
                m.fds[0], region.guest_phys_addr, region.size, region.user_addr, region.mmap_offset
            )
            self.memory.add(mapped)
        except BadMemoryRegion as exc:
            raise Refused(m.request, str(exc)) from None
        finally:
            m.close_fds()
        log.info("memory region added: %s", mapped.describe())

    def _rem_mem_reg(self, m: Message) -> None:
        assert isinstance(m.payload, SingleMemRegion)
        m.close_fds()  # "the back-end MUST close it without using it otherwise"
        region = m.payload.region
        try:
            removed = self.memory.remove(region.guest_phys_addr, region.size, region.user_addr)
        except BadMemoryRegion as exc:
            raise Refused(m.request, str(exc)) from None
        log.info("memory region removed: %s", removed.describe())

    # -- rings -----------------------------------------------------------------
    def _ring(self, index: int) -> Ring:
        return self.rings[index]

    def _set_vring_num(self, m: Message) -> None:
        assert isinstance(m.payload, VringState)
        ring = self._ring(m.payload.index)
        size = m.payload.num
        if ring.started:
            raise Refused(m.request, f"ring {ring.config.index} is running")
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise Refused(m.request, f"ring size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        ring.config.size = size

    def _set_vring_addr(self, m: Message) -> None:
        a = m.payload
        assert isinstance(a, VringAddr)
        ring = self._ring(a.index)
        if ring.started:
            raise Refused(m.request, f"ring {a.index} is running")
        c = ring.config
        c.desc_addr, c.used_addr, c.avail_addr = a.desc_user_addr, a.used_user_addr, a.avail_user_addr
        c.log_guest_addr = a.log_guest_addr
        c.log_used = bool(a.flags & 1)

    def _set_vring_base(self, m: Message) -> None:
        assert isinstance(m.payload, VringState)
        ring = self._ring(m.payload.index)
        if ring.started:
            raise Refused(m.request, f"ring {ring.config.index} is running")
        if m.payload.num > 0xFFFF:
            raise Refused(m.request, f"split ring base {m.payload.num} is above 65535")
        ring.config.base = m.payload.num

    def _get_vring_base(self, m: Message) -> Message:
        assert isinstance(m.payload, VringState)
        ring = self._ring(m.payload.index)
        self._stop_ring(ring)
        # The ring restarts only on a new SET_VRING_KICK.
        ring.config.replace_fd("kick_fd", None)
        return reply(m.request, VringState(ring.config.index, ring.config.base))

    def _set_vring_kick(self, m: Message) -> None:
        assert isinstance(m.payload, VringFile)
        ring = self._ring(m.payload.index)
        if m.payload.no_fd:
            raise Refused(m.request, "polling mode (no kick fd) is not supported")
        was_running = ring.started
        self._stop_ring(ring)
        ring.config.replace_fd("kick_fd", m.fds[0])
        try:
            self._start_ring(ring)
        except InvalidQueueConfig as exc:
            log.error("ring %d not started: %s", ring.config.index, exc)
            raise Refused(m.request, str(exc)) from None
        log.debug("ring %d %s", ring.config.index, "restarted" if was_running else "started")

    def _set_vring_call(self, m: Message) -> None:
        assert isinstance(m.payload, VringFile)
        ring = self._ring(m.payload.index)
        with ring.call_lock:  # the worker may be signalling the old one right now
            ring.config.replace_fd("call_fd", None if m.payload.no_fd else m.fds[0])

    def _set_vring_err(self, m: Message) -> None:
        assert isinstance(m.payload, VringFile)
        ring = self._ring(m.payload.index)
        with ring.call_lock:
            ring.config.replace_fd("err_fd", None if m.payload.no_fd else m.fds[0])

    def _set_vring_enable(self, m: Message) -> None:
        assert isinstance(m.payload, VringState)
        if not self.acked_features & VF.VHOST_USER_F_PROTOCOL_FEATURES and self.features_set:
            raise Refused(m.request, "needs VHOST_USER_F_PROTOCOL_FEATURES acked")
        if m.payload.num not in (0, 1):
            raise Refused(m.request, f"enable value {m.payload.num} is not 0 or 1")
        ring = self._ring(m.payload.index)
        ring.config.enabled = bool(m.payload.num)
        if ring.worker is not None:
            ring.worker.set_enabled(ring.config.enabled)

    def _start_ring(self, ring: Ring) -> None:
        c = ring.config
        if not c.addresses_set or c.size == 0:
            raise InvalidQueueConfig(f"queue {c.index}: size or addresses not set")
        if not self.acked_features & VF.VHOST_USER_F_PROTOCOL_FEATURES:
            c.enabled = True  # without protocol features rings start enabled
        queue = SplitQueue(
            c,
            DirectSpace(self.memory, "uva"),
            DirectSpace(self.memory, "gpa"),
            event_idx=bool(self.acked_features & VF.EVENT_IDX),
            indirect=bool(self.acked_features & VF.INDIRECT_DESC),
        )
        ring.broken_reason = None
        c.broken = False
        ring.worker = QueueWorker(queue, c, self.device, ring.call_lock, self._ring_broken)
        ring.worker.start()
        log.info(
            "ring %d started: size %d base %d used %d %s",
            c.index,
            c.size,
            c.base,
            queue.used_idx,
            "enabled" if c.enabled else "disabled",
        )

    def _stop_ring(self, ring: Ring) -> None:
        if ring.worker is None:
            return
        worker, ring.worker = ring.worker, None
        ring.config.base = worker.stop()
        log.info(
            "ring %d stopped at avail index %d (%d requests served)",
            ring.config.index,
            ring.config.base,
            worker.completed,
        )

    def _ring_broken(self, index: int, reason: str) -> None:
        """Called from a worker thread: the driver broke the ring."""
        ring = self.rings[index]
        ring.broken_reason = reason
        ring.config.broken = True
        self.status |= STATUS_NEEDS_RESET
        with ring.call_lock:
            signal_eventfd(ring.config.err_fd)

    # -- config space ----------------------------------------------------------
    def _get_config(self, m: Message) -> Message:
        p = m.payload
        assert isinstance(p, ConfigSpace)
        try:
            data = self.device.read_config(p.offset, p.size)
        except DeviceError as exc:
            raise Refused(m.request, str(exc)) from None
        return reply(m.request, ConfigSpace(p.offset, p.size, p.flags, data))

    def _set_config(self, m: Message) -> None:
        p = m.payload
        assert isinstance(p, ConfigSpace)
        try:
            self.device.write_config(p.offset, p.data)
        except DeviceError as exc:
            raise Refused(m.request, str(exc)) from None

    def _set_backend_req_fd(self, m: Message) -> None:
        if self.backend_channel_fd is not None:
            os.close(self.backend_channel_fd)
        self.backend_channel_fd = m.fds[0]

    # -- device status and reset -------------------------------------------------
    def _set_status(self, m: Message) -> None:
        assert isinstance(m.payload, U64)
        status = m.payload.value
        if status > 0xFF:
            raise Refused(m.request, f"status {status:#x} does not fit the u8 of virtio")
        if status == 0:
            self.device_reset("SET_STATUS 0", keep_ring_bases=True)
        self.status = status
        log.info("device status %#04x", status)

    def _get_status(self, m: Message) -> Message:
        return reply(m.request, U64(self.status))

    def _reset_device(self, m: Message) -> None:
        self.device_reset("RESET_DEVICE")

    def device_reset(self, cause: str, *, keep_ring_bases: bool = False) -> None:
        """Stop every ring and reset the device; the memory table stays.

        After SET_STATUS 0 QEMU still reads each ring's base with
        GET_VRING_BASE (its stop sequence sends the status first), so the
        bases are kept; RESET_DEVICE starts the rings over from zero.
        """
        self.counters["device_resets"] += 1
        for ring in self.rings:
            self._stop_ring(ring)
            c = ring.config
            c.enabled = False
            c.broken = False
            ring.broken_reason = None
            if not keep_ring_bases:
                c.base = 0
        self.status = 0
        self.device.reset()
        log.info("device reset (%s): rings stopped, memory table kept (%d regions)", cause, len(self.memory))

    # -- end of connection -------------------------------------------------------
    def close(self) -> None:
        """The front-end went away: stop rings, release fds and mappings."""
        for ring in self.rings:
            self._stop_ring(ring)
            ring.config.close_fds()
        if self.backend_channel_fd is not None:
            close_all([self.backend_channel_fd])
            self.backend_channel_fd = None
        self.memory.clear()
        self.device.reset()

    def describe_state(self) -> dict[str, object]:
        return {
            "features": self.acked_features,
            "protocol_features": self.acked_protocol_features,
            "status": self.status,
            "memory_regions": len(self.memory),
            "rings": [
                {
                    "index": r.config.index,
                    "started": r.started,
                    "enabled": r.config.enabled,
                    "base": r.config.base,
                    "broken": r.broken_reason,
                }
                for r in self.rings
            ],
            **self.counters,
        }


def _name(code: int) -> str:
    try:
        return R(code).name
    except ValueError:
        return f"REQUEST_{code}"
