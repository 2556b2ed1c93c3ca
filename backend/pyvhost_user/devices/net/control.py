"""The control virtqueue: parse one command from its chain, carry it out.

A command chain is ``u8 class, u8 command, data...`` (device-readable) then
``u8 ack`` (device-writable). Parsing is apart from doing: ``parse_command``
checks the layout and the sizes the spec gives each command, and
``NetControl.execute`` changes the device state; both answer a refused
command with VIRTIO_NET_ERR in the ack byte, as the spec asks, never with a
broken ring. A command whose feature was not negotiated is refused too.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .constants import (
    ETH_ALEN,
    CtrlAnnounce,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    CtrlVlan,
    NetFeature,
    VLAN_VID_LIMIT,
)
from .rx_filter import RxFilter

log = logging.getLogger(__name__)


class CtrlError(Exception):
    """A command the device refuses (answered with VIRTIO_NET_ERR)."""


@dataclass(frozen=True)
class CtrlCommand:
    cls: int
    command: int
    data: bytes


# The feature each command class (or RX command) needs, as the spec ties them.
_CLASS_FEATURE = {
    CtrlClass.RX: NetFeature.CTRL_RX,
    CtrlClass.VLAN: NetFeature.CTRL_VLAN,
    CtrlClass.ANNOUNCE: NetFeature.GUEST_ANNOUNCE,
    CtrlClass.MQ: NetFeature.MQ,
}
_RX_EXTRA = (CtrlRx.ALLUNI, CtrlRx.NOMULTI, CtrlRx.NOUNI, CtrlRx.NOBCAST)


def parse_command(readable: bytes) -> CtrlCommand:
    """The command in a chain's device-readable bytes."""
    if len(readable) < 2:
        raise CtrlError(f"command of {len(readable)} bytes has no class and command")
    return CtrlCommand(readable[0], readable[1], bytes(readable[2:]))


def _mac_table(data: bytes, offset: int) -> tuple[list[bytes], int]:
    if len(data) < offset + 4:
        raise CtrlError("MAC table without its entry count")
    (entries,) = struct.unpack_from("<I", data, offset)
    offset += 4
    end = offset + entries * ETH_ALEN
    if entries > 0xFFFF or end > len(data):
        raise CtrlError(f"MAC table of {entries} entries does not fit {len(data)} bytes")
    return [data[i : i + ETH_ALEN] for i in range(offset, end, ETH_ALEN)], end


class NetControl:
    """Carries out control commands on the RX filter and the device's own state."""

    def __init__(
        self,
        rx_filter: RxFilter,
        *,
        max_pairs: int,
        set_pairs: Callable[[int], None],
        set_mac: Callable[[bytes], None],
        announce_acked: Callable[[], None],
    ) -> None:
        self.filter = rx_filter
        self.max_pairs = max_pairs
        self._set_pairs = set_pairs
        self._set_mac = set_mac
        self._announce_acked = announce_acked
        self.features = 0

    def execute(self, command: CtrlCommand) -> None:
        """Apply ``command``; raises ``CtrlError`` (nothing changed) when refused."""
        cls, cmd, data = command.cls, command.command, command.data
        needed = _CLASS_FEATURE.get(cls)  # type: ignore[call-overload]
        if needed is not None and not self.features & needed:
            raise CtrlError(f"class {cls} needs feature {needed.name}, not negotiated")
        if cls == CtrlClass.RX:
            self._rx(cmd, data)
        elif cls == CtrlClass.MAC:
            self._mac(cmd, data)
        elif cls == CtrlClass.VLAN:
            self._vlan(cmd, data)
        elif cls == CtrlClass.ANNOUNCE:
            if cmd != CtrlAnnounce.ACK:
                raise CtrlError(f"unknown ANNOUNCE command {cmd}")
            self._announce_acked()
        elif cls == CtrlClass.MQ:
            self._mq(cmd, data)
        else:
            raise CtrlError(f"unsupported command class {cls}")

    def _rx(self, cmd: int, data: bytes) -> None:
        if cmd > CtrlRx.NOBCAST:
            raise CtrlError(f"unknown RX command {cmd}")
        if cmd in _RX_EXTRA and not self.features & NetFeature.CTRL_RX_EXTRA:
            raise CtrlError(f"RX command {CtrlRx(cmd).name} needs CTRL_RX_EXTRA")
        if len(data) != 1:
            raise CtrlError(f"RX command with {len(data)} data bytes, not 1")
        setattr(self.filter, CtrlRx(cmd).name.lower(), bool(data[0]))

    def _mac(self, cmd: int, data: bytes) -> None:
        if cmd == CtrlMac.TABLE_SET:
            unicast, end = _mac_table(data, 0)
            multicast, end = _mac_table(data, end)
            if end != len(data):
                raise CtrlError(f"{len(data) - end} bytes after the MAC tables")
            self.filter.set_mac_tables(unicast, multicast)
        elif cmd == CtrlMac.ADDR_SET:
            if not self.features & NetFeature.CTRL_MAC_ADDR:
                raise CtrlError("MAC_ADDR_SET needs CTRL_MAC_ADDR")
            if len(data) != ETH_ALEN:
                raise CtrlError(f"MAC address of {len(data)} bytes")
            if data[0] & 1:
                raise CtrlError("a multicast address cannot be the device's")
            self._set_mac(data)
        else:
            raise CtrlError(f"unknown MAC command {cmd}")

    def _vlan(self, cmd: int, data: bytes) -> None:
        if len(data) != 2:
            raise CtrlError(f"VLAN command with {len(data)} data bytes, not 2")
        (vid,) = struct.unpack("<H", data)
        if vid >= VLAN_VID_LIMIT:
            raise CtrlError(f"VLAN id {vid} >= {VLAN_VID_LIMIT}")
        if cmd == CtrlVlan.ADD:
            self.filter.vlans.add(vid)
        elif cmd == CtrlVlan.DEL:
            self.filter.vlans.discard(vid)
        else:
            raise CtrlError(f"unknown VLAN command {cmd}")

    def _mq(self, cmd: int, data: bytes) -> None:
        if cmd != CtrlMq.VQ_PAIRS_SET:
            raise CtrlError(f"unsupported MQ command {cmd}")
        if len(data) != 2:
            raise CtrlError(f"VQ_PAIRS_SET with {len(data)} data bytes, not 2")
        (pairs,) = struct.unpack("<H", data)
        if not 1 <= pairs <= self.max_pairs:
            raise CtrlError(f"{pairs} queue pairs is not in 1..{self.max_pairs}")
        self._set_pairs(pairs)
