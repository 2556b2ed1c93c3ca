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
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..devices.base import Device, DeviceError
from ..memory import BadMemoryRegion, DirectSpace, GuestMemory, MappedRegion, map_region
from ..memory.address_spaces import AddressSpaces
from ..memory.dirty_log import DirtyLog, DirtyLogError
from ..memory import iotlb_state
from ..memory.iotlb import DefaultMapping, Iotlb, IotlbError, IotlbSpace
from ..memory.iotlb_state import IotlbStateError
from ..memory.map_cost import MapCostError, MapCostModel
from ..recorder import FlightRecorder
from ..virtqueue import InvalidQueueConfig, PackedQueue, QueueConfig, SplitQueue, signal_eventfd
from ..virtqueue.inflight import InflightQueue, InflightRegion
from ..virtqueue.inflight_packed import PackedInflightQueue
from ..wire import (
    U64,
    DEVICE_STATE_REPLY_NO_FD,
    AsidIotlbMsg,
    BackendRequest,
    ConfigSpace,
    DeviceStateDirection,
    DeviceStateTransfer,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    IotlbPerm,
    IotlbType,
    VendorProtocolFeature as VPF,
    VendorRequest as VR,
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
    encode_message,
    reply,
    request,
    request_name,
)
from . import device_state
from .device_state import DeviceState, DeviceStateError
from .options import BackendOptions, IotlbPersist, QueueWorkers
from .queue_process import ProcessQueueWorker
from .queue_worker import QueueWorker
from .state_transfer import LoadTransfer, SaveTransfer, StateTransfer, TransferError

log = logging.getLogger(__name__)

MAX_MEM_SLOTS = 32
MAX_QUEUE_SIZE = 1024

TRANSPORT_FEATURES = int(
    VF.VERSION_1
    | VF.VHOST_F_LOG_ALL
    | VF.INDIRECT_DESC
    | VF.EVENT_IDX
    | VF.VHOST_USER_F_PROTOCOL_FEATURES
    | VF.ACCESS_PLATFORM
    | VF.RING_PACKED
)
PROTOCOL_FEATURES = int(
    PF.MQ
    | PF.REPLY_ACK
    | PF.BACKEND_REQ
    | PF.CONFIG
    | PF.RESET_DEVICE
    | PF.CONFIGURE_MEM_SLOTS
    | PF.STATUS
    | PF.INFLIGHT_SHMFD
    | PF.LOG_SHMFD
    | PF.DEVICE_STATE
    | VPF.ADDRESS_SPACES
    | VPF.IOTLB_PERSIST
)

_LOG_ALL = int(VF.VHOST_F_LOG_ALL)

# virtio device status bits
STATUS_DRIVER_OK = 0x04
STATUS_NEEDS_RESET = 0x40

# Requests that change what a ring's worker process inherited when it was
# forked (its eventfds, enable state, used-ring logging, the memory table,
# features and the dirty log): such rings are stopped around them.
CHANGES_WHAT_WORKER_PROCESSES_INHERIT = frozenset({
    R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.SET_VRING_ADDR,
    R.SET_FEATURES, R.SET_LOG_BASE, R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG,
})

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
    **{code: VPF.ADDRESS_SPACES for code in VR},  # type: ignore[dict-item]
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
        R.GET_INFLIGHT_FD,
        VR.GET_NUM_ASIDS,
        VR.GET_VRING_GROUP,
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
    worker: QueueWorker | ProcessQueueWorker | None = None
    broken_reason: str | None = None

    @property
    def started(self) -> bool:
        return self.worker is not None


class Session:
    """The state of one front-end connection, and the dispatcher of its requests."""

    def __init__(
        self,
        device: Device,
        memory: GuestMemory | None = None,
        options: BackendOptions | None = None,
        events: Callable[[str, dict[str, Any]], None] | None = None,
        recorder: FlightRecorder | None = None,
    ) -> None:
        self.device = device
        self.options = options or BackendOptions()
        # _emit: events for the control socket (the server records them too);
        # recorder: steps only the flight recorder keeps (too many for operators).
        self._emit = events or (lambda _name, _data: None)
        self.recorder = recorder
        self.map_cost = MapCostModel(self.options.map_cost, self.options.map_cost_seconds_per_gib)
        self.reset_map_seconds = 0.0  # reset_map is never charged: it is measured
        self.memory = memory or GuestMemory(max_regions=MAX_MEM_SLOTS)
        # (gpa, size, uaddr) -> how many ADD_MEM_REG added it: QEMU's vhost-user-net
        # has one vhost_dev per queue pair on one connection, and each sends the
        # whole memory table (7.2 and 10.0, traced): the same region comes N times.
        # Only the very same memory counts: same fd offset and file (device, inode).
        self._region_adds: dict[tuple[int, int, int], int] = {}
        self._region_files: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        # Until a front-end says otherwise, it is a stock one: with ACCESS_PLATFORM
        # its ASID 0 is a guest vIOMMU's, so no ASID starts as identity.
        self.asids = AddressSpaces(
            self.memory, [DefaultMapping.EMPTY] * self.options.num_asids, device.num_groups
        )
        self._batch: list[tuple[int, IotlbMsg]] | None = None
        self._state_transfer: StateTransfer | None = None
        self.inflight: InflightRegion | None = None
        self._packed_rings_started: set[int] = set()  # rings started by this session (packed)
        self._dirty_log: DirtyLog | None = None
        self._backend_channel: socket.socket | None = None
        self._backend_channel_lock = threading.Lock()
        self.offered_features = TRANSPORT_FEATURES | device.device_features
        self.offered_protocol_features = PROTOCOL_FEATURES | _device_protocol_features(device)
        self.acked_features = 0
        self.features_set = False
        self.acked_protocol_features = 0
        self.owner = False
        self.status = 0
        self.backend_channel_fd: int | None = None
        self.rings = [Ring(QueueConfig(i)) for i in range(device.num_queues)]
        self.counters: dict[str, int] = {
            "requests": 0,
            "refused": 0,
            "device_resets": 0,
            "iotlb_updates": 0,
            "iotlb_invalidates": 0,
            "iotlb_misses_sent": 0,
            "reset_maps": 0,
            "iotlb_resets_by_device_reset": 0,
        }
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
            R.IOTLB_MSG: self._iotlb_msg,
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: self._set_log_fd,
            R.GET_INFLIGHT_FD: self._get_inflight_fd,
            R.SET_INFLIGHT_FD: self._set_inflight_fd,
            R.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            R.CHECK_DEVICE_STATE: self._check_device_state,
            R.SEND_RARP: self._send_rarp,
            R.NET_SET_MTU: self._net_set_mtu,
            VR.GET_NUM_ASIDS: self._get_num_asids,
            VR.GET_VRING_GROUP: self._get_vring_group,
            VR.SET_GROUP_ASID: self._set_group_asid,
            VR.IOTLB_MSG_ASID: self._iotlb_msg_asid,
            VR.IOTLB_BATCH_BEGIN: self._iotlb_batch_begin,
            VR.IOTLB_BATCH_END: self._iotlb_batch_end,
            VR.RESET_MAP: self._reset_map,
        }

    # -- entry point -----------------------------------------------------------
    def handle(self, message: Message) -> list[Message]:
        """Carry out one request; return the replies to send (maybe none)."""
        self.counters["requests"] += 1
        code = message.request
        paused: list[Ring] = []
        try:
            self._check_gates(message)
            handler = self._handlers.get(code)
            if handler is None:
                raise Refused(code, "request not supported by this back-end")
            inherited = code in CHANGES_WHAT_WORKER_PROCESSES_INHERIT
            if inherited:
                allowed_before = self._worker_process_allowed()
                paused = self._pause_rings(ProcessQueueWorker, _ring_of(message))
            try:
                answer = handler(message)
            finally:
                if inherited and not allowed_before and self._worker_process_allowed():
                    # Logging just ended (a migration cancelled): back to processes.
                    paused += self._pause_rings(QueueWorker)
                self._resume_rings(paused)
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
        if message.need_reply or self._reply_due_unasked(code):
            return [self._failure(code)]
        return []

    def _reply_due_unasked(self, code: int) -> bool:
        # With LOG_SHMFD, QEMU reads a reply to SET_LOG_BASE although it sets no
        # NEED_REPLY; without it no reply is due, and a stray one would be taken
        # as the answer to the next request. Likewise the device state requests.
        if code in (R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE):
            return bool(self.acked_protocol_features & PF.DEVICE_STATE)
        return code == R.SET_LOG_BASE and bool(self.acked_protocol_features & PF.LOG_SHMFD)

    def _failure(self, code: int) -> Message:
        if code == R.SET_DEVICE_STATE_FD and self._reply_due_unasked(code):
            # Its own u64, not an ack: an error in bits 0-7, and the no-fd bit, as a
            # failure returns no fd (vhost-user.rst).
            return reply(code, U64(DEVICE_STATE_REPLY_NO_FD | 1))
        return ack(code, False)

    def refuse_malformed(self, code: int, flags: int) -> list[Message]:
        """Answer a message the wire layer could not decode (its bytes were consumed)."""
        self.counters["refused"] += 1
        if flags & 0x4:
            # A reply where only requests can come: whatever the front-end thinks the
            # conversation is, it is not this one. Answering could pair a nack with
            # the wrong request; closing cannot.
            raise Disconnect(f"the front-end sent a reply ({_name(code)}) nobody asked for")
        if code in HAS_REPLY or code == R.GET_CONFIG:
            raise Disconnect(f"malformed {_name(code)}: the front-end waits for a reply")
        need_reply = bool(flags & 0x8)
        return [self._failure(code)] if need_reply or self._reply_due_unasked(code) else []

    def _check_gates(self, message: Message) -> None:
        code = message.request
        needed = REQUIRED_PROTOCOL_FEATURE.get(code)
        if needed is not None and not self.acked_protocol_features & needed:
            raise Refused(code, f"needs protocol feature {needed.name}, not negotiated")
        if code in NEEDS_OWNER and not self.owner:
            raise Refused(code, "SET_OWNER has not been sent")
        payload = message.payload
        if code == VR.SET_GROUP_ASID:
            return  # its index is a group, checked by the handler
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
        names = PF(m.payload.value & 0xFFFFFFFF)
        vendor = VPF(m.payload.value & (VPF.ADDRESS_SPACES | VPF.IOTLB_PERSIST))
        log.info("protocol features acked: %s%s", names, f" + vendor {vendor}" if vendor else "")
        default = self.options.asid_default if self.extension_acked else DefaultMapping.EMPTY
        for iotlb in self.asids.iotlbs:
            if iotlb.default is not default and iotlb.is_default:
                iotlb.default = default
                iotlb.reset_map()
        if self.options.iotlb_persist is IotlbPersist.ALWAYS and not self.persist_negotiated:
            log.warning(
                "--iotlb-persist always with a front-end that did not ask for it: device "
                "resets keep IOTLB entries it may not invalidate (stale translations possible)"
            )

    @property
    def extension_acked(self) -> bool:
        return bool(self.acked_protocol_features & VPF.ADDRESS_SPACES)

    @property
    def persist_negotiated(self) -> bool:
        return bool(self.acked_protocol_features & VPF.IOTLB_PERSIST)

    @property
    def persist_active(self) -> bool:
        policy = self.options.iotlb_persist
        if policy is IotlbPersist.ALWAYS:
            return True
        if policy is IotlbPersist.NEVER:
            return False
        return self.persist_negotiated

    @property
    def access_platform(self) -> bool:
        return bool(self.acked_features & VF.ACCESS_PLATFORM)

    @property
    def packed(self) -> bool:
        return bool(self.acked_features & VF.RING_PACKED)

    def _set_owner(self, m: Message) -> None:
        if self.owner:
            # The front-end initialises its device again on this connection: QEMU 7.2
            # does after device_del / device_add with the chardev kept, and then sends
            # the whole memory table again (ADD_MEM_REG for regions we still hold would
            # be refused as overlaps and fail its vhost start). Start over as a new
            # session would; what was negotiated before SET_OWNER stays.
            log.warning("SET_OWNER again: the front-end re-initialises the device; rings "
                        "stopped, memory table dropped, ASIDs it changed reset")
            self.device_reset("SET_OWNER again")
            self._release_front_end_state()
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
                        self.options.memory_seal,
                    )
                )
        except BadMemoryRegion as exc:
            raise Refused(m.request, str(exc)) from None
        finally:
            m.close_fds()  # mapped regions keep the memory; the fds are not needed
        for region in table.regions:
            self._charge_table_region(m.request, region)
        self.memory.clear()
        self._region_adds.clear()
        self._region_files.clear()
        for region in table.regions:
            self.memory.add(region)
        for region in self.memory.regions:
            log.info("memory region: %s", region.describe())

    def _add_mem_reg(self, m: Message) -> None:
        assert isinstance(m.payload, SingleMemRegion)
        region = m.payload.region
        key = (region.guest_phys_addr, region.size, region.user_addr)
        try:
            st = os.fstat(m.fds[0])
            backing = (region.mmap_offset, st.st_dev, st.st_ino)
        except OSError:
            backing = None
        if backing is not None and self._region_files.get(key) == backing:
            m.close_fds()  # the region we hold is the same memory
            self._region_adds[key] = self._region_adds.get(key, 1) + 1
            log.info("memory region at gpa %#x added again (%d times): kept as it is",
                     region.guest_phys_addr, self._region_adds[key])
            return
        try:
            mapped = map_region(
                m.fds[0], region.guest_phys_addr, region.size, region.user_addr, region.mmap_offset,
                self.options.memory_seal,
            )
            self.memory.add(mapped)
        except BadMemoryRegion as exc:
            raise Refused(m.request, str(exc)) from None
        finally:
            m.close_fds()
        try:
            self._charge_table_region(m.request, mapped)
        except Refused:
            self.memory.remove(mapped.guest_phys_addr, mapped.size, mapped.user_addr)
            raise
        if backing is not None:
            self._region_files[key] = backing
        log.info("memory region added: %s", mapped.describe())

    def _charge_table_region(self, code: int, region: MappedRegion) -> None:
        """Without an IOTLB the memory table is the device's DMA mapping: it costs
        what the map-cost model says (with one, the IOTLB updates are charged)."""
        if self.access_platform:
            return
        try:
            took = self.map_cost.charge(region.size, lambda: [region.slice(0, region.size)])
        except MapCostError as exc:
            raise Refused(code, str(exc)) from None
        if took and self.recorder is not None:
            self.recorder.instant("mapping", "MAP_REGION", gpa=region.guest_phys_addr,
                                  size=region.size, map_seconds=took)

    def _rem_mem_reg(self, m: Message) -> None:
        assert isinstance(m.payload, SingleMemRegion)
        m.close_fds()  # "the back-end MUST close it without using it otherwise"
        region = m.payload.region
        key = (region.guest_phys_addr, region.size, region.user_addr)
        if self._region_adds.get(key, 1) > 1:
            self._region_adds[key] -= 1
            log.info("memory region at gpa %#x removed by one of its %d adders: kept",
                     region.guest_phys_addr, self._region_adds[key] + 1)
            return
        self._region_adds.pop(key, None)
        self._region_files.pop(key, None)
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
        if self.packed:
            if not 0 < size <= MAX_QUEUE_SIZE:  # packed rings need no power of 2
                raise Refused(m.request, f"packed ring size {size} is not in 1..{MAX_QUEUE_SIZE}")
        elif not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise Refused(m.request, f"ring size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        ring.config.size = size

    def _set_vring_addr(self, m: Message) -> None:
        a = m.payload
        assert isinstance(a, VringAddr)
        ring = self._ring(a.index)
        c = ring.config
        if ring.started:
            # QEMU turns used-ring logging on and off on running rings (migration);
            # the ring itself must stay where it is.
            if (c.desc_addr, c.used_addr, c.avail_addr) != (
                a.desc_user_addr, a.used_user_addr, a.avail_user_addr
            ):
                raise Refused(m.request, f"ring {a.index} is running: its addresses cannot move")
            c.log_guest_addr = a.log_guest_addr
            c.log_used = bool(a.flags & 1)
            log.info("ring %d: used-ring logging %s at gpa %#x", a.index,
                     "on" if c.log_used else "off", a.log_guest_addr)
            return
        c.desc_addr, c.used_addr, c.avail_addr = a.desc_user_addr, a.used_user_addr, a.avail_user_addr
        c.log_guest_addr = a.log_guest_addr
        c.log_used = bool(a.flags & 1)

    def _set_vring_base(self, m: Message) -> None:
        assert isinstance(m.payload, VringState)
        ring = self._ring(m.payload.index)
        if ring.started:
            raise Refused(m.request, f"ring {ring.config.index} is running")
        if m.payload.num > 0xFFFF and not self.packed:
            raise Refused(m.request, f"split ring base {m.payload.num} is above 65535")
        ring.config.base = m.payload.num

    def _get_vring_base(self, m: Message) -> Message:
        assert isinstance(m.payload, VringState)
        ring = self._ring(m.payload.index)
        was_running = ring.started
        self._stop_ring(ring)
        # The ring restarts only on a new SET_VRING_KICK.
        ring.config.replace_fd("kick_fd", None)
        if (
            was_running
            and not self.acked_protocol_features & (PF.STATUS | PF.RESET_DEVICE)
            and not any(r.started for r in self.rings)
        ):
            # Without SET_STATUS or RESET_DEVICE, all rings stopped is the only
            # sign of a device reset a front-end gives.
            self._iotlb_policy_on_reset("all rings stopped")
        return reply(m.request, VringState(ring.config.index, ring.config.base))

    def _set_vring_kick(self, m: Message) -> None:
        assert isinstance(m.payload, VringFile)
        ring = self._ring(m.payload.index)
        if m.payload.no_fd:
            raise Refused(m.request, "polling mode (no kick fd) is not supported")
        _require_eventfd(m.request, m.fds[0], "kick")
        was_running = ring.started
        self._stop_ring(ring)
        ring.config.replace_fd("kick_fd", m.fds[0])
        try:
            self._start_ring(ring)
        except InvalidQueueConfig as exc:
            log.error("ring %d not started: %s", ring.config.index, exc)
            ring.config.kick_fd = None  # the refusal closes the message's fd
            raise Refused(m.request, str(exc)) from None
        log.debug("ring %d %s", ring.config.index, "restarted" if was_running else "started")

    def _set_vring_call(self, m: Message) -> None:
        assert isinstance(m.payload, VringFile)
        ring = self._ring(m.payload.index)
        if not m.payload.no_fd:
            _require_eventfd(m.request, m.fds[0], "call")
        with ring.call_lock:  # the worker may be signalling the old one right now
            ring.config.replace_fd("call_fd", None if m.payload.no_fd else m.fds[0])

    def _set_vring_err(self, m: Message) -> None:
        assert isinstance(m.payload, VringFile)
        ring = self._ring(m.payload.index)
        if not m.payload.no_fd:
            _require_eventfd(m.request, m.fds[0], "error")
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

    def _pause_rings(self, served_by: type, only: int | None = None) -> list[Ring]:
        """Stop the running rings whose worker is a ``served_by`` (or only ring
        ``only``); ``_resume_rings`` starts them again, from where they were.
        Worker processes are paused around requests that change what they
        inherited; threads when rings can move to processes (logging ended)."""
        # A broken ring stays as it is: its worker has ended, and it waits for a reset.
        paused = [r for r in self.rings
                  if isinstance(r.worker, served_by) and not r.config.broken
                  and (only is None or r.config.index == only)]
        for ring in paused:
            self._stop_ring(ring)
        return paused

    def _resume_rings(self, rings: list[Ring]) -> None:
        for ring in rings:
            if ring.started:
                continue
            try:
                self._start_ring(ring)
            except InvalidQueueConfig as exc:  # e.g. its memory was just removed
                log.error("ring %d could not start again: %s", ring.config.index, exc)
                self._ring_broken(ring.config.index, str(exc))

    def _worker_process_allowed(self) -> bool:
        """Whether a ring may run in a worker process now (queue_process.py):
        not behind an IOTLB, not while writes are logged (both change under a
        running ring, and a child would not see it)."""
        mode = self.options.queue_workers
        return (
            (mode is QueueWorkers.PROCESSES
             or (mode is QueueWorkers.AUTO and self.device.num_queues > 1))
            and self.device.allows_worker_processes
            and not self.access_platform
            and not self.acked_features & _LOG_ALL
        )

    def _start_ring(self, ring: Ring) -> None:
        c = ring.config
        if not c.addresses_set or c.size == 0:
            raise InvalidQueueConfig(f"queue {c.index}: size or addresses not set")
        if not self.acked_features & VF.VHOST_USER_F_PROTOCOL_FEATURES:
            c.enabled = True  # without protocol features rings start enabled
        inflight = self._inflight_queue(c.index, c.size)
        ring_options: dict[str, Any] = {}
        queue_class: type[SplitQueue] | type[PackedQueue] = SplitQueue
        if self.packed:
            queue_class = PackedQueue
            # A record this session did not write (a reconnect) holds the used
            # position; after our own stop the base we answered is the truth.
            ring_options["recover_inflight"] = c.index not in self._packed_rings_started
            self._packed_rings_started.add(c.index)
        if self.access_platform:
            # Ring and buffer addresses are IOVAs of the ring's group's ASID;
            # rings are translated by the worker, which can wait for a miss.
            group = self.device.queue_group(c.index)
            space = IotlbSpace(self.asids.iotlb_of_group(group))
            queue = queue_class(
                c, space, space,
                event_idx=bool(self.acked_features & VF.EVENT_IDX),
                indirect=bool(self.acked_features & VF.INDIRECT_DESC),
                eager=False,
                inflight=inflight,  # type: ignore[arg-type]
                **ring_options,
            )
        else:
            queue = queue_class(
                c,
                DirectSpace(self.memory, "uva"),
                DirectSpace(self.memory, "gpa"),
                event_idx=bool(self.acked_features & VF.EVENT_IDX),
                indirect=bool(self.acked_features & VF.INDIRECT_DESC),
                eager=False,
                inflight=inflight,  # type: ignore[arg-type]
                **ring_options,
            )
            queue.ensure_rings()  # refuse the kick now if the rings are not in memory
        if queue.resubmit:
            log.warning("ring %d: resubmitting %d request(s) a previous back-end left in flight: "
                        "heads %s", c.index, len(queue.resubmit),
                        [r[0] if isinstance(r, tuple) else r for r in queue.resubmit])
        ring.broken_reason = None
        c.broken = False
        if self._worker_process_allowed():
            ring.worker = ProcessQueueWorker(
                queue, c, self.device, self._ring_broken, self._first_io,
                io_threads=self.options.io_threads,
            )
        else:
            ring.worker = QueueWorker(
                queue, c, self.device, ring.call_lock, self._ring_broken, translations=self,
                on_first_completion=self._first_io, io_threads=self.options.io_threads,
            )
        ring.worker.start()
        self._emit("RING_STARTED", {"queue": c.index, "size": c.size, "base": c.base,
                                    "enabled": c.enabled})
        if isinstance(queue, PackedQueue):
            log.info("ring %d started: packed, size %d base %#x, resuming at %d wrap %d, "
                     "used %d wrap %d %s", c.index, c.size, c.base, queue.avail_pos,
                     queue.avail_wrap, queue.used_pos, queue.used_wrap,
                     "enabled" if c.enabled else "disabled")
            return
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
        self._emit("RING_STOPPED", {"queue": ring.config.index, "base": ring.config.base,
                                    "served": worker.completed})
        log.info(
            "ring %d stopped at avail index %d (%d requests served)",
            ring.config.index,
            ring.config.base,
            worker.completed,
        )

    def _first_io(self, index: int, after_start: float) -> None:
        """Called from a worker thread: its first completion since the ring started."""
        if self.recorder is not None:
            self.recorder.instant("io", "FIRST_IO", queue=index,
                                  ms_after_ring_start=round(after_start * 1000, 3))

    def _ring_broken(self, index: int, reason: str) -> None:
        """Called from a worker thread: the driver broke the ring."""
        ring = self.rings[index]
        ring.broken_reason = reason
        ring.config.broken = True
        self.status |= STATUS_NEEDS_RESET
        with ring.call_lock:
            signal_eventfd(ring.config.err_fd)
        self._emit("QUEUE_BROKEN", {"queue": index, "reason": reason})

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
        try:
            channel = socket.socket(fileno=m.fds[0])
        except OSError as exc:
            raise Refused(m.request, f"the backend-request fd is not a socket: {exc.strerror}") from None
        if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_STREAM:
            channel.detach()  # the refusal closes the message's fd
            raise Refused(m.request, "the backend-request fd is not a Unix stream socket")
        with self._backend_channel_lock:
            if self._backend_channel is not None:
                self._backend_channel.close()
            self._backend_channel = channel
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
        self._iotlb_policy_on_reset(cause)
        log.info("device reset (%s): rings stopped, memory table kept (%d regions)", cause, len(self.memory))

    def _iotlb_policy_on_reset(self, cause: str) -> None:
        """A device reset binds every group to ASID 0; the IOTLBs follow the policy."""
        self.asids.rebind_all_to_asid0()
        kept = self.persist_active
        if not kept:
            for iotlb in self.asids.iotlbs:
                if not iotlb.is_default:
                    iotlb.reset_map()
                    self.counters["iotlb_resets_by_device_reset"] += 1
        self._emit(
            "DEVICE_RESET",
            {"cause": cause, "iotlb": "kept" if kept else "reset", "address_spaces": self.asids.describe()},
        )
        log.info(
            "IOTLB on device reset (%s): %s", cause,
            "kept (persistence active)" if kept else "every ASID back to its default",
        )

    # -- end of connection -------------------------------------------------------
    def close(self) -> None:
        """The front-end went away: stop rings, release fds and mappings."""
        self._end_state_transfer("the front-end disconnected")
        for ring in self.rings:
            self._stop_ring(ring)
            ring.config.close_fds()
        with self._backend_channel_lock:
            if self._backend_channel is not None:
                self._backend_channel.close()
                self._backend_channel = None
                self.backend_channel_fd = None
        self.inflight = None  # the front-end keeps the fd; a next back-end gets it back
        self._release_front_end_state("front-end disconnected")
        self.device.reset()

    def _release_front_end_state(self, cause: str = "SET_OWNER again") -> None:
        """What a front-end set up that the next one must not inherit: its dirty log,
        the ASIDs it changed (back to their defaults) and its memory table."""
        self._dirty_log = None
        touched = self.asids.reset_touched()
        if touched:
            who = "front-end gone" if cause == "front-end disconnected" else cause
            log.info("%s: ASIDs %s it changed are back to their defaults", who, touched)
            self._emit("RESET_MAP", {"asids": touched, "cause": cause})
        self.memory.clear()
        self._region_adds.clear()
        self._region_files.clear()

    # -- dirty logging (live migration) -------------------------------------------
    def dirty_log(self) -> DirtyLog | None:
        # Asked once per request by every queue worker: a plain int test, not a
        # Flag operation (which costs as much as a quarter of a 4 KiB read).
        if self.acked_features & _LOG_ALL:
            return self._dirty_log
        return None

    def _set_log_base(self, m: Message) -> Message:
        p = m.payload
        assert isinstance(p, LogDescription)
        try:
            self._dirty_log = DirtyLog(m.fds[0], p.mmap_size, p.mmap_offset,
                                      self.options.memory_seal)
        except DirtyLogError as exc:
            raise Refused(m.request, str(exc)) from None
        finally:
            m.close_fds()
        log.info("dirty log: %d bytes, covers %d MiB of guest memory",
                 p.mmap_size, self._dirty_log.covered_bytes >> 20)
        # QEMU waits for this reply with LOG_SHMFD although it sets no NEED_REPLY.
        return reply(m.request, U64(0))

    def _set_log_fd(self, m: Message) -> None:
        # An eventfd to signal log changes: QEMU syncs the log on its own schedule.
        m.close_fds()

    # -- inflight tracking (survives a back-end crash) --------------------------------
    def _inflight_queue(self, index: int, size: int) -> InflightQueue | PackedInflightQueue | None:
        if self.inflight is None:
            return None
        if self.inflight.packed != self.packed:
            log.warning("ring %d: the inflight buffer has the %s layout, the ring is %s", index,
                        "packed" if self.inflight.packed else "split",
                        "packed" if self.packed else "split")
            return None
        if index >= self.inflight.num_queues or size != self.inflight.queue_size:
            log.warning("ring %d (size %d) is not covered by the inflight buffer (%d queues of %d)",
                        index, size, self.inflight.num_queues, self.inflight.queue_size)
            return None
        return self.inflight.queues[index]

    def _get_inflight_fd(self, m: Message) -> Message:
        p = m.payload
        assert isinstance(p, InflightDescription)
        if not 0 < p.num_queues <= len(self.rings):
            raise Refused(m.request, f"inflight for {p.num_queues} queues; the device has {len(self.rings)}")
        if not 0 < p.queue_size <= MAX_QUEUE_SIZE or (
                p.queue_size & (p.queue_size - 1) and not self.packed):
            raise Refused(m.request, f"inflight queue size {p.queue_size} is not a power of 2")
        region, fd = InflightRegion.allocate(p.num_queues, p.queue_size, packed=self.packed)
        self._packed_rings_started.clear()  # a new record: nothing in it to recover
        self.inflight = region
        log.info("inflight buffer: %d bytes for %d queue(s) of %d", region.mmap_size,
                 p.num_queues, p.queue_size)
        return reply(m.request, InflightDescription(region.mmap_size, 0, p.num_queues, p.queue_size),
                     fds=[fd])

    def _set_inflight_fd(self, m: Message) -> None:
        p = m.payload
        assert isinstance(p, InflightDescription)
        try:
            if not 0 < p.num_queues <= len(self.rings):
                raise InvalidQueueConfig(f"{p.num_queues} queues; the device has {len(self.rings)}")
            region = InflightRegion(m.fds[0], p.mmap_size, p.mmap_offset, p.num_queues,
                                    p.queue_size, self.options.memory_seal, packed=self.packed)
        except InvalidQueueConfig as exc:
            raise Refused(m.request, str(exc)) from None
        finally:
            m.close_fds()
        self.inflight = region
        in_flight = sum(len(q.in_flight_entries() if region.packed else q.in_flight_heads())
                        for q in region.queues)
        log.info("inflight buffer set: %d queue(s) of %d, %d request(s) recorded in flight",
                 p.num_queues, p.queue_size, in_flight)

    # -- device state transfer (live migration) -------------------------------------
    def _set_device_state_fd(self, m: Message) -> Message:
        """Start saving or loading the back-end's state through the front-end's fd.

        We always use the front-end's channel (one of ours would be a pipe too,
        no faster), so the reply has the no-fd bit. A save takes the state here;
        the bytes move on a thread (state_transfer.py); a load is checked and
        applied at CHECK_DEVICE_STATE, all or nothing.
        """
        p = m.payload
        assert isinstance(p, DeviceStateTransfer)
        running = [r.config.index for r in self.rings if r.started]
        if running:
            raise Refused(m.request, f"rings {running} are running: the device state moves "
                          "only while every ring is stopped")
        self._end_state_transfer("replaced by a new SET_DEVICE_STATE_FD")
        try:
            transfer: StateTransfer
            if p.direction == DeviceStateDirection.SAVE:
                transfer = SaveTransfer(m.fds[0], device_state.encode(self._capture_state()))
            else:
                transfer = LoadTransfer(m.fds[0], device_state.MAX_STATE_BYTES)
        except (TransferError, DeviceStateError, IotlbStateError) as exc:
            raise Refused(m.request, f"device state {_direction(p)}: {exc}") from None
        m.fds = ()  # the transfer closes it
        transfer.start()
        self._state_transfer = transfer
        log.info("device state %s started", _direction(p))
        return reply(m.request, U64(DEVICE_STATE_REPLY_NO_FD))

    def _capture_state(self) -> DeviceState:
        # Address spaces exist for the extension's front-end only: a stock one
        # rebuilds its IOTLB through misses, as it expects to.
        spaces = iotlb_state.capture(self.asids) if self.extension_acked else None
        return DeviceState(self.device.export_state(), spaces)

    def _check_device_state(self, m: Message) -> Message:
        transfer, self._state_transfer = self._state_transfer, None
        if transfer is None:
            raise Refused(m.request, "no device state transfer to check")
        what = "save" if isinstance(transfer, SaveTransfer) else "load"
        outcome = transfer.finish()
        if outcome.error is not None:
            raise Refused(m.request, f"device state {what} failed: {outcome.error}")
        if isinstance(transfer, LoadTransfer):
            self._load_device_state(m.request, outcome.data)
        else:
            log.info("device state saved")
        return reply(m.request, U64(0))

    def _load_device_state(self, code: int, data: bytes) -> None:
        """Check all of it, then apply all of it: a refused state changes nothing."""
        running = [r.config.index for r in self.rings if r.started]
        if running:
            raise Refused(code, f"device state load: rings {running} started during the transfer")
        try:
            state = device_state.decode(data)
            self.device.check_state(state.device)
            spaces = state.address_spaces
            if spaces is not None:
                if not self.extension_acked:
                    raise DeviceStateError("it carries address spaces and this front-end did "
                                           "not negotiate the address-space extension")
                iotlb_state.check_restorable(spaces, self.asids)
        except (DeviceStateError, DeviceError, IotlbStateError) as exc:
            raise Refused(code, f"device state load refused: {exc}") from None
        self.device.import_state(state.device)
        if spaces is not None:
            iotlb_state.restore(self.asids, spaces)
        log.info("device state loaded (%d bytes): %s", len(data),
                 "no address spaces" if spaces is None else
                 f"{spaces.entry_count} IOTLB entries in {len(spaces.iotlbs)} ASIDs, groups bound "
                 f"to ASIDs {list(spaces.group_asid)}"
                 + ("" if len(self.memory) else " (resolved against the memory table to come)"))

    def _end_state_transfer(self, why: str) -> None:
        transfer, self._state_transfer = self._state_transfer, None
        if transfer is not None:
            transfer.cancel()
            log.info("device state transfer ended unchecked: %s", why)

    # -- net requests ----------------------------------------------------------------
    def _send_rarp(self, m: Message) -> None:
        assert isinstance(m.payload, U64)
        # The first 6 bytes of the u64 are the guest's MAC (QEMU memcpy's it in).
        mac = m.payload.value.to_bytes(8, "little")[:6]
        try:
            self.device.send_rarp(mac)
        except (DeviceError, OSError) as exc:
            raise Refused(m.request, f"RARP not sent: {exc}") from None

    def _net_set_mtu(self, m: Message) -> None:
        assert isinstance(m.payload, U64)
        try:
            self.device.set_mtu(m.payload.value)
        except DeviceError as exc:
            raise Refused(m.request, str(exc)) from None

    # -- IOTLB ---------------------------------------------------------------------
    def iotlb(self, asid: int) -> Iotlb:
        return self.asids.iotlb(asid)

    def send_miss(self, asid: int, iova: int, perm: int) -> bool:
        """Worker threads: ask the front-end for a translation (BACKEND_IOTLB_MSG MISS).

        Sent without NEED_REPLY: the answer that matters is the UPDATE on the
        main channel, which the worker waits for on the IOTLB itself.
        """
        sent = self._send_iotlb_event(IotlbType.MISS, asid, iova, perm)
        if sent:
            self.counters["iotlb_misses_sent"] += 1
        if self.recorder is not None:
            self.recorder.instant("mapping", "IOTLB_MISS", asid=asid, iova=iova, perm=perm,
                                  sent=sent)
        return sent

    def send_access_fail(self, asid: int, iova: int, perm: int) -> bool:
        """Tell the front-end a device access was refused by its IOTLB (ACCESS_FAIL)."""
        return self._send_iotlb_event(IotlbType.ACCESS_FAIL, asid, iova, perm)

    def _send_iotlb_event(self, kind: IotlbType, asid: int, iova: int, perm: int) -> bool:
        if asid != 0:
            # The message has no ASID field: a front-end could not tell which
            # address space it is about. Other ASIDs are mapped in advance, as
            # vhost-vdpa front-ends do (the kernel sends no misses at all).
            return False
        with self._backend_channel_lock:
            channel = self._backend_channel
            if channel is None:
                return False
            msg = IotlbMsg(iova, 0, 0, IotlbPerm(perm), kind)
            data, _ = encode_message(
                request(BackendRequest.IOTLB_MSG, msg, backend_channel=True)
            )
            try:
                channel.sendall(data)
            except OSError as exc:
                log.error("cannot send an IOTLB %s to the front-end: %s", kind.name, exc)
                return False
        return True

    def _apply_iotlb(self, code: int, asid: int, msg: IotlbMsg) -> None:
        if not self.access_platform:
            raise Refused(code, "IOTLB message without ACCESS_PLATFORM negotiated")
        try:
            iotlb = self.asids.iotlb(asid)
        except IotlbError as exc:
            raise Refused(code, str(exc)) from None
        if len(self.memory) == 0 and msg.type == IotlbType.UPDATE:
            raise Refused(code, "IOTLB update before any memory table")
        try:
            if msg.type == IotlbType.UPDATE:
                if iotlb.has_entry(msg.iova, msg.size, msg.uaddr, int(msg.perm)):
                    return  # QEMU may answer two misses on one page with two updates
                iotlb.update_refusing_overlap(msg.iova, msg.size, msg.uaddr, int(msg.perm))
                try:
                    took = self.map_cost.charge(
                        msg.size, lambda: self.memory.views("uva", msg.uaddr, msg.size))
                except MapCostError as exc:
                    iotlb.invalidate_overlapping_whole(msg.iova, msg.size)  # just this entry
                    raise Refused(code, str(exc)) from None
                self.counters["iotlb_updates"] += 1
                self._emit("MAP", {"asid": asid, "iova": msg.iova, "size": msg.size,
                                   "uaddr": msg.uaddr, "perm": int(msg.perm),
                                   "map_seconds": took})
            elif msg.type == IotlbType.INVALIDATE:
                removed = iotlb.invalidate_overlapping_whole(msg.iova, msg.size)
                self.counters["iotlb_invalidates"] += 1
                self._emit("UNMAP", {"asid": asid, "iova": msg.iova, "size": msg.size,
                                     "entries_removed": removed})
            else:
                raise Refused(code, f"IOTLB message type {msg.type.name} is not for a back-end")
        except IotlbError as exc:
            raise Refused(code, str(exc)) from None

    def _iotlb_msg(self, m: Message) -> None:
        assert isinstance(m.payload, IotlbMsg)
        self._iotlb_or_batch(m.request, 0, m.payload)

    def _iotlb_msg_asid(self, m: Message) -> None:
        assert isinstance(m.payload, AsidIotlbMsg)
        self._iotlb_or_batch(m.request, m.payload.asid, m.payload.msg)

    def _iotlb_or_batch(self, code: int, asid: int, msg: IotlbMsg) -> None:
        if self._batch is not None:
            self._batch.append((asid, msg))
            return
        self._apply_iotlb(code, asid, msg)

    def _iotlb_batch_begin(self, m: Message) -> None:
        if self._batch is not None:
            raise Refused(m.request, "a batch is already open")
        self._batch = []

    def _iotlb_batch_end(self, m: Message) -> None:
        if self._batch is None:
            raise Refused(m.request, "no batch is open")
        batch, self._batch = self._batch, None
        failures = []
        for asid, msg in batch:
            try:
                self._apply_iotlb(VR.IOTLB_MSG_ASID, asid, msg)
            except Refused as exc:
                failures.append(exc.reason)
        if failures:
            raise Refused(m.request, f"{len(failures)} of {len(batch)} batched messages refused: "
                          + "; ".join(failures[:3]))

    def _get_num_asids(self, m: Message) -> Message:
        return reply(m.request, U64(self.asids.num_asids))

    def _get_vring_group(self, m: Message) -> Message:
        assert isinstance(m.payload, VringState)
        index = m.payload.index
        return reply(m.request, VringState(index, self.device.queue_group(index)))

    def _set_group_asid(self, m: Message) -> None:
        assert isinstance(m.payload, VringState)
        group, asid = m.payload.index, m.payload.num
        running = [r.config.index for r in self.rings
                   if r.started and self.device.queue_group(r.config.index) == group]
        if running:
            raise Refused(m.request, f"group {group} has running rings {running}")
        try:
            self.asids.bind_group(group, asid)
        except IotlbError as exc:
            raise Refused(m.request, str(exc)) from None
        log.info("group %d bound to ASID %d", group, asid)

    def _reset_map(self, m: Message) -> None:
        assert isinstance(m.payload, U64)
        try:
            self.reset_map(m.payload.value, cause="RESET_MAP request")
        except IotlbError as exc:
            raise Refused(m.request, str(exc)) from None

    def reset_map(self, asid: int, *, cause: str) -> dict[str, Any]:
        """Back to the default mapping (front-end request or operator); O(1) in mapped size."""
        iotlb = self.asids.iotlb(asid)
        before = iotlb.describe()
        started = time.perf_counter()
        iotlb.reset_map()
        cost = time.perf_counter() - started
        self.counters["reset_maps"] += 1
        self.reset_map_seconds += cost
        result = {"asid": asid, "entries_dropped": before["entries"],
                  "bytes_unmapped": before["mapped_bytes"], "seconds": cost}
        self._emit("RESET_MAP", {"asids": [asid], "cause": cause, **result})
        log.info("reset_map asid %d (%s): %d entries dropped, default %s restored",
                 asid, cause, before["entries"], iotlb.default.value)
        return result

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
                    # "thread", or "process <pid>" with --queue-workers processes
                    "worker": None if r.worker is None else (
                        f"process {r.worker.pid}" if isinstance(r.worker, ProcessQueueWorker)
                        else "thread"),
                }
                for r in self.rings
            ],
            **self.counters,
        }


def _require_eventfd(code: int, fd: int, what: str) -> None:
    """Kick, call and error fds are eventfds: anything else (a file that is always
    readable, a pipe's write end) would make the ring's worker spin or block."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise Refused(code, f"{what} fd {fd} cannot be inspected: {exc.strerror}") from None
    if target != "anon_inode:[eventfd]":
        raise Refused(code, f"{what} fd is not an eventfd ({target})")


def _ring_of(message: Message) -> int | None:
    """The ring a per-ring request is about (SET_VRING_CALL ...), None for the others."""
    if message.request in (R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE,
                           R.SET_VRING_ADDR):
        return getattr(message.payload, "index", None)
    return None


def _device_protocol_features(device: Device) -> int:
    """The protocol features only some devices can honour (net's RARP and MTU)."""
    return (int(PF.RARP) if device.sends_rarp else 0) | (int(PF.NET_MTU) if device.takes_mtu else 0)


def _name(code: int) -> str:
    return request_name(code)


def _direction(p: DeviceStateTransfer) -> str:
    return "save" if p.direction == DeviceStateDirection.SAVE else "load"
