"""The virtio-net device: TX chains to frames, frames to RX buffers, the control queue.

Queues, as the spec numbers them: receiveq1, transmitq1, ..., receiveqN,
transmitqN, then controlq. The control queue is in virtqueue group 1, the
data queues in group 0, so that a front-end with the address-space
extension can bind the control queue to its own ASID (vDPA's shadow
control virtqueue).

TX: each chain is one frame behind a virtio_net_hdr; the header is checked
and stripped and the frame goes to the packet port. RX: the port's thread
hands frames in; those the RX filter accepts wait in the backlog of one RX
queue (flows spread over the active pairs by a hash of addresses), whose
worker puts each in one buffer chain behind a header. Without MRG_RXBUF a
frame takes exactly one chain.
"""

from __future__ import annotations

import logging
import threading
import zlib
from typing import Any

from ...virtqueue.chain import DescriptorChain
from ..base import Device, DeviceError
from .config import NetConfig, format_mac
from .constants import (
    CTRL_ERR,
    CTRL_OK,
    ETH_HLEN,
    MAX_QUEUE_PAIRS,
    NetFeature,
    NetStatus,
)
from .control import CtrlError, NetControl, parse_command
from .frames import rarp_frame
from .header import NetHeader, header_bytes, rx_header
from .metrics import NetMetrics
from .port import PacketPort
from .rx_backlog import DEFAULT_BACKLOG_FRAMES, RxBacklog
from .rx_filter import RxFilter

log = logging.getLogger(__name__)

MIN_MTU = 68        # RFC 791; Linux's ETH_MIN_MTU
MAX_MTU = 65535

DATA_GROUP = 0
CONTROL_GROUP = 1


class NetDevice(Device):
    capability_type = "net"
    sends_rarp = True
    takes_mtu = True

    def __init__(
        self,
        port: PacketPort,
        *,
        mac: bytes,
        mtu: int = 1500,
        queue_pairs: int = 1,
        guest_announce: bool = True,
        backlog_frames: int = DEFAULT_BACKLOG_FRAMES,
    ) -> None:
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise DeviceError(f"--queue-pairs {queue_pairs} is not in 1..{MAX_QUEUE_PAIRS}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"--mtu {mtu} is not in {MIN_MTU}..{MAX_MTU}")
        if len(mac) != 6 or mac[0] & 1:
            raise DeviceError(f"{format_mac(mac)} is not a unicast MAC address")
        self.port = port
        self.configured_mac = bytes(mac)
        self.mac = bytes(mac)
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.guest_announce = guest_announce
        self.metrics = NetMetrics()
        self.features = 0
        self.hdr_bytes = header_bytes(0)
        self.status = NetStatus.LINK_UP
        # Pairs the driver asked for with VQ_PAIRS_SET; 1 until it does (spec 5.1.6.5.5).
        self.active_pairs = 1
        self.filter = RxFilter(self.mac)
        self.control = NetControl(
            self.filter, max_pairs=queue_pairs, set_pairs=self._set_pairs,
            set_mac=self._set_mac, announce_acked=self._announce_acked,
        )
        self._backlogs = [RxBacklog(backlog_frames) for _ in range(queue_pairs)]
        self._ready_rx: set[int] = set()  # pair indexes whose RX queue runs, enabled
        self._lock = threading.Lock()
        port.start(self.deliver)

    # -- queues ------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return 2 * self.queue_pairs + 1

    @property
    def control_queue(self) -> int:
        return 2 * self.queue_pairs

    @property
    def num_groups(self) -> int:
        return 2

    def queue_group(self, queue_index: int) -> int:
        return CONTROL_GROUP if queue_index == self.control_queue else DATA_GROUP

    def is_rx(self, queue_index: int) -> bool:
        return queue_index < self.control_queue and queue_index % 2 == 0

    def work_fd(self, queue_index: int) -> int | None:
        return self._backlogs[queue_index // 2].fd if self.is_rx(queue_index) else None

    def has_work(self, queue_index: int) -> bool:
        if self.is_rx(queue_index):
            return len(self._backlogs[queue_index // 2]) > 0
        return True

    def queue_ready(self, queue_index: int, ready: bool) -> None:
        if not self.is_rx(queue_index):
            return
        with self._lock:
            if ready:
                self._ready_rx.add(queue_index // 2)
            else:
                self._ready_rx.discard(queue_index // 2)

    # -- features and config ---------------------------------------------------------
    @property
    def device_features(self) -> int:
        features = (
            NetFeature.MAC | NetFeature.STATUS | NetFeature.MTU | NetFeature.CTRL_VQ
            | NetFeature.CTRL_RX | NetFeature.CTRL_RX_EXTRA | NetFeature.CTRL_VLAN
            | NetFeature.CTRL_MAC_ADDR | NetFeature.MQ
        )
        if self.guest_announce:
            features |= NetFeature.GUEST_ANNOUNCE
        return int(features)

    def set_features(self, features: int) -> None:
        self.features = features
        self.hdr_bytes = header_bytes(features)
        self.control.features = features
        self.filter.vlan_filtering = bool(features & NetFeature.CTRL_VLAN)

    def read_config(self, offset: int, size: int) -> bytes:
        data = NetConfig(self.mac, int(self.status), self.queue_pairs, self.mtu).encode()
        # Past our fields (speed, duplex, RSS: not offered) reads as zero.
        return (data + bytes(max(0, offset + size - len(data))))[offset : offset + size]

    def reset(self) -> None:
        self.mac = self.configured_mac
        self.filter.reset(self.mac, vlan_filtering=False)
        self.active_pairs = 1
        self.status = NetStatus.LINK_UP
        self.features = 0
        self.hdr_bytes = header_bytes(0)
        self.control.features = 0
        with self._lock:
            self._ready_rx.clear()
        for backlog in self._backlogs:
            backlog.clear()

    # -- the three kinds of queue ----------------------------------------------------
    def process(self, queue_index: int, chain: DescriptorChain) -> int:
        if chain.access_denied is not None:
            self.metrics.add(chains_access_denied=1)
            log.error("queue %d: chain refused by the IOMMU: %s", queue_index, chain.access_denied)
            return 0
        if queue_index == self.control_queue:
            return self._control(chain)
        if self.is_rx(queue_index):
            return self._receive(queue_index, chain)
        return self._transmit(chain)

    def _transmit(self, chain: DescriptorChain) -> int:
        packet = b"".join(chain.readable)
        if len(packet) < self.hdr_bytes + ETH_HLEN:
            self.metrics.add(tx_dropped_malformed=1)
            return 0
        if NetHeader.decode(packet[: self.hdr_bytes]).asks_offload:
            self.metrics.add(tx_dropped_offload=1)
            return 0
        frame = packet[self.hdr_bytes :]
        self.port.send(frame)
        self.metrics.add(tx_frames=1, tx_bytes=len(frame))
        return 0

    def _receive(self, queue_index: int, chain: DescriptorChain) -> int:
        frame = self._backlogs[queue_index // 2].take()
        if frame is None:  # has_work said there was one; only this worker takes
            return 0
        data = rx_header(self.hdr_bytes) + frame
        if len(data) > chain.writable_len:
            # One frame, one chain (no MRG_RXBUF): the buffer is given back empty,
            # which a driver counts as a length error.
            self.metrics.add(rx_dropped_too_big=1)
            return 0
        _scatter(chain.writable, data)
        self.metrics.add(rx_frames=1, rx_bytes=len(frame))
        return len(data)

    def _control(self, chain: DescriptorChain) -> int:
        if not chain.writable:
            self.metrics.add(ctrl_refused=1)
            log.warning("control command without an ack byte: dropped")
            return 0
        self.metrics.add(ctrl_commands=1)
        ack = CTRL_OK
        try:
            command = parse_command(b"".join(chain.readable))
            self.control.execute(command)
            log.debug("control command class %d command %d done", command.cls, command.command)
        except CtrlError as exc:
            self.metrics.add(ctrl_refused=1)
            log.warning("control command refused: %s", exc)
            ack = CTRL_ERR
        last = chain.writable[-1]
        last[len(last) - 1] = ack
        return 1

    # -- frames from the packet port -------------------------------------------------
    def deliver(self, frame: bytes) -> None:
        """A frame from the network: filtered, then queued for an RX queue."""
        if len(frame) < ETH_HLEN:
            self.metrics.add(rx_dropped_runt=1)
            return
        if not self.filter.accepts(frame):
            self.metrics.add(rx_filtered=1)
            return
        if not self._backlogs[self._rx_pair_for(frame)].put(frame):
            self.metrics.add(rx_dropped_backlog_full=1)


    def _rx_pair_for(self, frame: bytes) -> int:
        """Spread flows over the pairs whose RX queue is ready (and the driver
        enabled with VQ_PAIRS_SET); one flow always lands on one queue.

        VQ_PAIRS_SET counts only when the front-end acked CTRL_VQ, i.e. passes
        the control queue through to us. QEMU and DPDK's virtio_user keep the
        control queue (CTRL_VQ is never acked to the back-end) and turn the
        driver's VQ_PAIRS_SET into SET_VRING_ENABLE: then the enabled rings
        alone say which pairs are in use."""
        with self._lock:
            if self.features & NetFeature.CTRL_VQ:
                ready = (sorted(p for p in self._ready_rx if p < self.active_pairs)
                         or sorted(self._ready_rx))
            else:
                ready = sorted(self._ready_rx)
        if len(ready) <= 1:
            return ready[0] if ready else 0
        # addresses: Ethernet source and destination, and IPv4's when there are
        return ready[zlib.crc32(frame[:12] + frame[26:34]) % len(ready)]

    # -- what the driver changed with control commands -----------------------------------
    def _set_pairs(self, pairs: int) -> None:
        self.active_pairs = pairs
        log.info("driver uses %d queue pair(s)", pairs)

    def _set_mac(self, mac: bytes) -> None:
        self.mac = bytes(mac)
        self.filter.mac = self.mac
        log.info("driver set the MAC address to %s", format_mac(mac))

    def _announce_acked(self) -> None:
        self.status &= ~NetStatus.ANNOUNCE

    def request_announce(self) -> None:
        """Ask the driver to announce itself (it acks with ANNOUNCE_ACK)."""
        if self.features & NetFeature.GUEST_ANNOUNCE:
            self.status |= NetStatus.ANNOUNCE

    # -- vhost-user's net requests -------------------------------------------------------
    def send_rarp(self, mac: bytes) -> None:
        self.port.send(rarp_frame(mac))
        self.metrics.add(rarps_sent=1)
        log.info("RARP broadcast from %s sent on %s", format_mac(mac), self.port.name)

    def set_mtu(self, mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"MTU {mtu} is not in {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu
        log.info("MTU set to %d by the front-end", mtu)

    # -- the rest of the contract ----------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        return {**super().export_state(), "mac": format_mac(self.configured_mac),
                "queue_pairs": self.queue_pairs, "mtu": self.mtu}

    def describe(self) -> str:
        return (f"virtio-net {format_mac(self.mac)} mtu {self.mtu}, {self.queue_pairs} "
                f"queue pair(s) + control queue, on {self.port.name}")

    def describe_state(self) -> dict[str, Any]:
        return {"mac": format_mac(self.mac), "active_pairs": self.active_pairs,
                "filter": self.filter.describe(), "backlog": [len(b) for b in self._backlogs],
                **self.metrics.snapshot()}

    def close(self) -> None:
        self.port.close()
        for backlog in self._backlogs:
            backlog.close()


def _scatter(views: list[memoryview], data: bytes) -> None:
    offset = 0
    for view in views:
        piece = data[offset : offset + len(view)]
        view[: len(piece)] = piece
        offset += len(piece)
        if offset >= len(data):
            return
