"""A device's address spaces (ASIDs) and the binding of virtqueue groups to them.

As in vDPA: a device has ``num_asids`` IOTLBs; its virtqueues are split into
groups (blk: one; net: data queues and the control queue); each group is
bound to one ASID. A device reset binds every group back to ASID 0 (the rule
vdpa_sim follows); it does not touch the IOTLBs themselves, which is the
point of the seed: mappings live apart from the virtio life cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

from .guest_memory import GuestMemory
from .iotlb import DefaultMapping, Iotlb, IotlbError


class AddressSpaces:
    def __init__(
        self,
        memory: GuestMemory,
        defaults: Sequence[DefaultMapping],
        num_groups: int,
    ) -> None:
        if not defaults:
            raise ValueError("a device has at least one address space")
        if num_groups < 1:
            raise ValueError("a device has at least one virtqueue group")
        self.memory = memory
        self.iotlbs = [Iotlb(asid, memory, default) for asid, default in enumerate(defaults)]
        self.group_asid = [0] * num_groups

    @property
    def num_asids(self) -> int:
        return len(self.iotlbs)

    @property
    def num_groups(self) -> int:
        return len(self.group_asid)

    def iotlb(self, asid: int) -> Iotlb:
        if not 0 <= asid < len(self.iotlbs):
            raise IotlbError(f"asid {asid} does not exist (the device has {len(self.iotlbs)})")
        return self.iotlbs[asid]

    def iotlb_of_group(self, group: int) -> Iotlb:
        return self.iotlbs[self.group_asid[group]]

    def bind_group(self, group: int, asid: int) -> None:
        if not 0 <= group < len(self.group_asid):
            raise IotlbError(f"group {group} does not exist (the device has {self.num_groups})")
        self.iotlb(asid)
        self.group_asid[group] = asid

    def rebind_all_to_asid0(self) -> None:
        """Device reset: every group goes back to ASID 0 (mappings untouched)."""
        self.group_asid = [0] * len(self.group_asid)

    def reset_map(self, asid: int) -> None:
        self.iotlb(asid).reset_map()

    def reset_all(self) -> None:
        for iotlb in self.iotlbs:
            iotlb.reset_map()

    def reset_touched(self) -> list[int]:
        """reset_map every ASID the front-end changed (what the kernel does on release)."""
        touched = [t.asid for t in self.iotlbs if t.touched]
        for asid in touched:
            self.iotlbs[asid].reset_map()
        return touched

    def describe(self) -> list[dict[str, object]]:
        out = []
        for iotlb in self.iotlbs:
            info = iotlb.describe()
            info["groups"] = [g for g, a in enumerate(self.group_asid) if a == iotlb.asid]
            out.append(info)
        return out
