"""What the driver asked to receive: RX modes, MAC tables, VLAN filter.

The rules and their order are QEMU's virtio-net ``receive_filter`` (the
reference behaviour guests are tested against): promiscuous takes
everything; then a tagged frame needs its VLAN id in the table (when VLAN
filtering is on); broadcast passes unless NOBCAST; other multicast needs
ALLMULTI, an overflowed or matching multicast table, and no NOMULTI;
unicast needs ALLUNI, our MAC, an overflowed or matching unicast table, and
no NOUNI. The state starts promiscuous (QEMU's reset state): a driver that
never sends a control command gets everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import BROADCAST_MAC, ETH_ALEN, ETH_HLEN, ETH_P_8021Q, MAC_TABLE_ENTRIES


@dataclass
class RxFilter:
    mac: bytes
    vlan_filtering: bool = False  # CTRL_VLAN negotiated: tagged frames need a table entry
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    unicast_overflow: bool = False
    multicast_overflow: bool = False
    vlans: set[int] = field(default_factory=set)

    def reset(self, mac: bytes, *, vlan_filtering: bool) -> None:
        """Back to the state of a device reset."""
        self.__init__(mac, vlan_filtering=vlan_filtering)  # type: ignore[misc]

    def set_mac_tables(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        self.unicast_overflow = len(unicast) > MAC_TABLE_ENTRIES
        self.multicast_overflow = len(multicast) > MAC_TABLE_ENTRIES
        self.unicast = [] if self.unicast_overflow else list(unicast)
        self.multicast = [] if self.multicast_overflow else list(multicast)

    def accepts(self, frame: bytes | memoryview) -> bool:
        if len(frame) < ETH_HLEN:
            return False
        if self.promisc:
            return True
        if self.vlan_filtering and int.from_bytes(frame[12:14], "big") == ETH_P_8021Q:
            if len(frame) < ETH_HLEN + 4:
                return False
            if int.from_bytes(frame[14:16], "big") & 0xFFF not in self.vlans:
                return False
        dest = bytes(frame[:ETH_ALEN])
        if dest[0] & 1:
            if dest == BROADCAST_MAC:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.multicast_overflow or dest in self.multicast
        if self.nouni:
            return False
        return self.alluni or self.unicast_overflow or dest == self.mac or dest in self.unicast

    def describe(self) -> dict[str, object]:
        return {
            "promisc": self.promisc, "allmulti": self.allmulti, "alluni": self.alluni,
            "nomulti": self.nomulti, "nouni": self.nouni, "nobcast": self.nobcast,
            "unicast": len(self.unicast), "multicast": len(self.multicast),
            "vlans": sorted(self.vlans),
        }
