"""The virtio-net driver side, on top of ``Frontend``: send and receive frames.

Queues as the spec numbers them: RX 2i, TX 2i+1 for each pair i, then the
control queue. Split or packed rings (``packed=True`` accepts
VIRTIO_F_RING_PACKED; the ring layout follows what was negotiated), with or
without an IOMMU (``iommu=``: ACCESS_PLATFORM acked, descriptors and ring
addresses are IOVAs, the back-end's misses answered in the background, as
with the blk driver). Each RX ring is kept full of one-descriptor buffers of
``rx_buffer_bytes`` (header + frame, as Linux's small-buffer mode without
MRG_RXBUF); a received buffer is read and given back at once. A TX frame is
one readable descriptor: a zero header and the frame. Completions are
waited for on the call eventfds with poll(), never by sleeping.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ..devices.net.config import NetConfig
from ..devices.net.constants import (
    NET_HDR_V1_BYTES,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    CtrlVlan,
    NetFeature,
)
from ..wire import VirtioFeature
from .client import DEFAULT_TIMEOUT, Frontend
from .errors import FrontendError, FrontendTimeout, ProtocolViolation
from .guest_ram import GuestRam
from .iommu import Iommu, IommuMode
from .packed_ring import PackedRing
from .split_ring import SplitRing

NET_CONFIG_SIZE: Final = NetConfig.LAYOUT.size  # mac, status, max pairs, mtu
NET_DRIVER_FEATURES: Final = int(
    NetFeature.MAC | NetFeature.STATUS | NetFeature.MTU | NetFeature.CTRL_VQ
    | NetFeature.CTRL_RX | NetFeature.CTRL_RX_EXTRA | NetFeature.CTRL_VLAN
    | NetFeature.CTRL_MAC_ADDR | NetFeature.GUEST_ANNOUNCE | NetFeature.MQ
    | VirtioFeature.EVENT_IDX | VirtioFeature.INDIRECT_DESC | VirtioFeature.VERSION_1
)
RX_BUFFER_BYTES: Final = NET_HDR_V1_BYTES + 1518 + 4 + 2  # header, VLAN-tagged frame, slack
ZERO_HEADER: Final = bytes(NET_HDR_V1_BYTES)


class CtrlRefused(FrontendError):
    """The device answered a control command with VIRTIO_NET_ERR."""


@dataclass
class Received:
    """One frame from an RX queue, with the header the device put before it."""

    queue: int
    header: bytes
    frame: bytes


class NetDriver:
    """A virtio-net driver over a vhost-user ``Frontend``."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        queue_pairs: int = 1,
        queue_size: int = 256,
        driver_features: int = NET_DRIVER_FEATURES,
        rx_buffer_bytes: int = RX_BUFFER_BYTES,
        io_timeout: float = 10.0,
        packed: bool = False,
    ) -> None:
        """``packed``: accept VIRTIO_F_RING_PACKED (used when the back-end offers it)."""
        self.frontend = frontend
        self.queue_pairs = queue_pairs
        self.queue_size = queue_size
        self.driver_features = driver_features | (VirtioFeature.RING_PACKED if packed else 0)
        self.rx_buffer_bytes = rx_buffer_bytes
        self.io_timeout = io_timeout
        self.config: NetConfig | None = None
        self._rx_buffers: list[dict[int, int]] = [{} for _ in range(queue_pairs)]  # head -> gpa
        self._tx_buffers: list[dict[int, int]] = [{} for _ in range(queue_pairs)]
        self.tx_completed = 0

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        ram: GuestRam | None = None,
        profile: str = "qemu-10.0",
        queue_pairs: int = 1,
        queue_size: int = 256,
        timeout: float = DEFAULT_TIMEOUT,
        driver_features: int = NET_DRIVER_FEATURES,
        extension: bool = False,
        packed: bool = False,
        iommu: Iommu | IommuMode | None = None,
        premap: bool = False,
    ) -> NetDriver:
        """Connect and start. ``packed``: accept packed rings; ``iommu``: present
        IOVAs (see ``Frontend``); ``premap``: UPDATE the whole page table at start."""
        frontend = Frontend.connect(path, ram, timeout=timeout, profile=profile,
                                    extension=extension, iommu=iommu, premap=premap)
        driver = cls(frontend, queue_pairs=queue_pairs, queue_size=queue_size,
                     driver_features=driver_features, packed=packed)
        try:
            driver.start()
        except BaseException:
            frontend.close()
            raise
        return driver

    # -- queues ----------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return 2 * self.queue_pairs + 1

    @property
    def control_queue(self) -> int:
        return 2 * self.queue_pairs

    def ring(self, queue: int) -> SplitRing | PackedRing:
        ring = self.frontend.queue(queue).ring
        if ring is None:
            raise FrontendError(f"queue {queue} is not started")
        return ring

    @property
    def ram(self) -> GuestRam:
        return self.frontend.ram

    @property
    def features(self) -> int:
        return self.frontend.acked_features

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: the rings are packed."""
        return bool(self.features & VirtioFeature.RING_PACKED)

    @property
    def access_platform(self) -> bool:
        """VIRTIO_F_ACCESS_PLATFORM was negotiated: the device sees IOVAs."""
        return self.frontend.access_platform

    def start(self) -> None:
        """Handshake with GET_CONFIG, driver start of every queue, RX rings filled."""
        self.frontend.handshake(num_queues=self.num_queues, config_size=NET_CONFIG_SIZE)
        self.config = NetConfig.decode(self.frontend.config)
        self.frontend.start_device([self.queue_size] * self.num_queues, self.driver_features)
        for pair in range(self.queue_pairs):
            self._fill_rx(pair)

    def reboot(self) -> None:
        """A guest reboot (``Frontend.reboot``: rings stopped, [RESET_DEVICE],
        started again fresh): buffers in the old rings are forgotten, RX refilled."""
        for buffers in (*self._rx_buffers, *self._tx_buffers):
            for gpa in buffers.values():
                self.ram.free(gpa)
            buffers.clear()
        self.frontend.reboot()
        for pair in range(self.queue_pairs):
            self._fill_rx(pair)

    def close(self) -> None:
        self.frontend.close()

    def __enter__(self) -> NetDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_config(self) -> NetConfig:
        self.config = NetConfig.decode(self.frontend.get_config(0, NET_CONFIG_SIZE))
        return self.config

    # -- receive -----------------------------------------------------------------------
    def _fill_rx(self, pair: int) -> None:
        ring = self.ring(2 * pair)
        buffers = self._rx_buffers[pair]
        while ring.free_descriptors:
            gpa = self.ram.alloc(self.rx_buffer_bytes, 64)
            segments = [(gpa, self.rx_buffer_bytes, True)]
            if _descriptors(ring, segments) > ring.free_descriptors:
                # Behind a shuffling IOMMU a buffer may take a descriptor per IOVA run.
                self.ram.free(gpa)
                break
            head = ring.add_chain(segments)
            buffers[head] = gpa
        if ring.publish():
            self.frontend.kick(2 * pair)

    def _reap_rx(self, pair: int) -> list[Received]:
        ring = self.ring(2 * pair)
        buffers = self._rx_buffers[pair]
        got = []
        for head, used_len in ring.pop_used():
            gpa = buffers.pop(head)
            if used_len > self.rx_buffer_bytes:
                raise ProtocolViolation(f"RX used.len {used_len} > buffer {self.rx_buffer_bytes}")
            data = self.ram.read(gpa, used_len)
            self.ram.free(gpa)
            got.append(Received(2 * pair, data[:NET_HDR_V1_BYTES], data[NET_HDR_V1_BYTES:]))
        if got:
            self._fill_rx(pair)
        return got

    def receive(self, count: int = 1, *, timeout: float | None = None) -> list[Received]:
        """Wait until ``count`` frames arrived on any RX queue; return them all (maybe more)."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        got: list[Received] = []
        while True:
            for pair in range(self.queue_pairs):
                got += self._reap_rx(pair)
            if len(got) >= count:
                return got
            self._wait([2 * p for p in range(self.queue_pairs)], deadline,
                       f"{len(got)} of {count} frame(s) received")

    def receive_frames(self, count: int, *, timeout: float | None = None) -> list[bytes]:
        return [r.frame for r in self.receive(count, timeout=timeout)]

    def poll_received(self) -> list[Received]:
        """What has arrived so far, without waiting."""
        return [r for pair in range(self.queue_pairs) for r in self._reap_rx(pair)]

    # -- send --------------------------------------------------------------------------
    def _reap_tx(self, pair: int) -> None:
        buffers = self._tx_buffers[pair]
        for head, _used_len in self.ring(2 * pair + 1).pop_used():
            self.ram.free(buffers.pop(head))
            self.tx_completed += 1

    def send(self, frames: Iterable[bytes], *, pair: int = 0, timeout: float | None = None) -> int:
        """Queue each frame on TX queue ``pair`` (waiting for room when the ring is
        full); return how many were sent. Completion is not waited for."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        queue = 2 * pair + 1
        ring = self.ring(queue)
        buffers = self._tx_buffers[pair]
        sent = 0
        for frame in frames:
            packet = ZERO_HEADER + bytes(frame)
            gpa = self.ram.alloc(len(packet), 64)
            self.ram.write(gpa, packet)
            segments = [(gpa, len(packet), False)]
            needed = _descriptors(ring, segments)
            try:
                while ring.free_descriptors < needed:
                    self._publish(queue)
                    self._reap_tx(pair)
                    if ring.free_descriptors < needed:
                        self._wait([queue], deadline, "room on the TX ring")
            except BaseException:
                self.ram.free(gpa)
                raise
            head = ring.add_chain(segments)
            buffers[head] = gpa
            sent += 1
        self._publish(queue)
        self._reap_tx(pair)
        return sent

    def flush_tx(self, *, pair: int = 0, timeout: float | None = None) -> None:
        """Wait until the device used every frame queued on TX queue ``pair``."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        while True:
            self._reap_tx(pair)
            if not self._tx_buffers[pair]:
                return
            self._wait([2 * pair + 1], deadline, f"{len(self._tx_buffers[pair])} TX frame(s) used")

    def _publish(self, queue: int) -> None:
        if self.ring(queue).publish():
            self.frontend.kick(queue)

    # -- control queue --------------------------------------------------------------
    def control(self, cls: int, command: int, data: bytes = b"", *,
                timeout: float | None = None) -> int:
        """Send one control command; return the ack byte (0 OK, 1 ERR)."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        queue = self.control_queue
        ring = self.ring(queue)
        command_gpa = self.ram.alloc(2 + len(data) + 1, 16)
        ack_gpa = command_gpa + 2 + len(data)
        self.ram.write(command_gpa, bytes([cls, command]) + data + b"\xff")
        head = ring.add_chain([(command_gpa, 2 + len(data), False), (ack_gpa, 1, True)])
        self._publish(queue)
        try:
            while True:
                for used_head, used_len in ring.pop_used():
                    if used_head != head:
                        raise ProtocolViolation(f"control queue used head {used_head}, not {head}")
                    if used_len != 1:
                        raise ProtocolViolation(f"control command used.len {used_len}, not 1")
                    return self.ram.read(ack_gpa, 1)[0]
                self._wait([queue], deadline, "control command answered")
        finally:
            self.ram.free(command_gpa)

    def _checked(self, cls: int, command: int, data: bytes = b"") -> None:
        ack = self.control(cls, command, data)
        if ack != 0:
            raise CtrlRefused(f"control class {cls} command {command} answered {ack}")

    def set_rx_mode(self, mode: CtrlRx, on: bool) -> None:
        self._checked(CtrlClass.RX, mode, bytes([int(on)]))

    def set_mac_tables(self, unicast: Sequence[bytes], multicast: Sequence[bytes]) -> None:
        data = (struct.pack("<I", len(unicast)) + b"".join(unicast)
                + struct.pack("<I", len(multicast)) + b"".join(multicast))
        self._checked(CtrlClass.MAC, CtrlMac.TABLE_SET, data)

    def set_mac(self, mac: bytes) -> None:
        self._checked(CtrlClass.MAC, CtrlMac.ADDR_SET, mac)

    def vlan(self, vid: int, add: bool = True) -> None:
        self._checked(CtrlClass.VLAN, CtrlVlan.ADD if add else CtrlVlan.DEL, struct.pack("<H", vid))

    def set_queue_pairs(self, pairs: int) -> None:
        self._checked(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", pairs))

    # -- waiting ---------------------------------------------------------------------
    def _wait(self, queues: Sequence[int], deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrontendTimeout(f"timed out waiting for {what}")
        poller = select.poll()
        states = [self.frontend.queue(q) for q in queues]
        for state in states:
            poller.register(state.call_fd, select.POLLIN)
        poller.poll(remaining * 1000)
        for state in states:
            state.clear_call()


def _descriptors(ring: SplitRing | PackedRing, segments: list[tuple[int, int, bool]]) -> int:
    """Ring descriptors ``segments`` take: one per IOVA run behind an IOMMU."""
    return len(ring.dma_segments(segments))
