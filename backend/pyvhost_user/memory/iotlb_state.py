"""A device's address spaces as a portable value: every ASID's IOTLB and the group bindings.

Captured on a migration source and restored on the destination (the device
state of ``VHOST_USER_SET_DEVICE_STATE_FD``), so that the destination need not
rebuild its mappings through misses or a replay of UPDATEs.

The addressing rule. An IOTLB UPDATE names its target by a *front-end user
address*, an address inside the VMM process. The destination is served by
another front-end process, where the same guest memory lies at other user
addresses (and even one front-end may send a different memory table next
time). Of the addresses the protocol knows, only the guest physical address
means the same thing on both sides. So:

* ``capture`` turns each entry's target into a guest physical address through
  the source's memory table. An entry whose user range is not one guest
  physical range (it would straddle regions that are adjacent in user space
  only) cannot be captured, and the save fails; QEMU's entries never do, as
  each lies inside one RAM block;
* ``restore`` installs entries whose target *is* a guest physical address
  ("gpa" entries, see iotlb.py). Every translation resolves them through the
  memory table the destination has at that moment, so it does not matter
  whether the front-end sends its table before or after the state (QEMU sends
  it after: at device start, when the migration has completed);
* a passthrough (identity) ASID is a flag, guest physical by definition;
* ``check_restorable``: when the destination already has a memory table, every
  entry must lie inside it, or nothing is restored. Without a table yet, an
  entry that the table sent later does not cover faults when it is used, as
  an unmapped address does (that request fails, or the ring is marked
  broken); it never reaches memory it does not name.

Values of this module are checked when built: a state that exists is well
formed (sorted, non-overlapping, non-empty entries with a known permission,
bindings to ASIDs that exist), whichever stream it was decoded from.
"""

from __future__ import annotations

from dataclasses import dataclass

from .address_spaces import AddressSpaces
from .errors import GuestMemoryError, UnmappedAddress
from .iotlb import PERM_READ, PERM_WRITE, U64_MASK, DefaultMapping, IotlbEntry


class IotlbStateError(GuestMemoryError):
    """An address-space state that is malformed, cannot be captured, or does not fit."""


@dataclass(frozen=True, slots=True)
class IotlbState:
    """One ASID: its default, whether it is in passthrough, its entries (all "gpa")."""

    asid: int
    default: DefaultMapping
    passthrough: bool
    entries: tuple[IotlbEntry, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.asid <= 0xFFFFFFFF:
            raise IotlbStateError(f"asid {self.asid} is not a u32")
        if self.passthrough and self.entries:
            raise IotlbStateError(
                f"asid {self.asid}: passthrough with {len(self.entries)} entries "
                "(the first UPDATE ends passthrough)"
            )
        previous_last = -1
        for entry in self.entries:
            where = f"asid {self.asid} entry iova {entry.iova:#x} size {entry.size:#x}"
            if entry.kind != "gpa":
                raise IotlbStateError(f"{where}: target is a {entry.kind}, not a gpa")
            if entry.size <= 0 or entry.iova < 0 or entry.iova + entry.size - 1 > U64_MASK:
                raise IotlbStateError(f"{where}: empty, or wraps past 2**64")
            if entry.target < 0 or entry.target + entry.size - 1 > U64_MASK:
                raise IotlbStateError(f"{where}: target {entry.target:#x} wraps past 2**64")
            if entry.perm not in (PERM_READ, PERM_WRITE, PERM_READ | PERM_WRITE):
                raise IotlbStateError(f"{where}: permission {entry.perm} is not RO, WO or RW")
            if entry.iova <= previous_last:
                raise IotlbStateError(f"{where}: not after the entry before it (unsorted "
                                      "or overlapping)")
            previous_last = entry.last

    @property
    def at_default(self) -> bool:
        return not self.entries and self.passthrough == (self.default is DefaultMapping.IDENTITY)


@dataclass(frozen=True, slots=True)
class AddressSpacesState:
    """Every ASID (0..n-1, in order) and, per virtqueue group, the ASID it is bound to."""

    group_asid: tuple[int, ...]
    iotlbs: tuple[IotlbState, ...]

    def __post_init__(self) -> None:
        if not self.iotlbs:
            raise IotlbStateError("no address space")
        if [t.asid for t in self.iotlbs] != list(range(len(self.iotlbs))):
            raise IotlbStateError(
                f"ASIDs {[t.asid for t in self.iotlbs]} are not 0..{len(self.iotlbs) - 1} in order"
            )
        if not self.group_asid:
            raise IotlbStateError("no virtqueue group")
        for group, asid in enumerate(self.group_asid):
            if not 0 <= asid < len(self.iotlbs):
                raise IotlbStateError(
                    f"group {group} bound to ASID {asid}; there are {len(self.iotlbs)}"
                )

    @property
    def entry_count(self) -> int:
        return sum(len(t.entries) for t in self.iotlbs)


def capture(asids: AddressSpaces) -> AddressSpacesState:
    """The address spaces as they are, every target made a guest physical address.

    Call it with every ring stopped: nothing else changes the IOTLBs then.
    Raises ``IotlbStateError`` for an entry whose target is not one guest
    physical range of the current memory table.
    """
    memory = asids.memory
    states = []
    for iotlb in asids.iotlbs:
        entries = []
        for entry in iotlb.entries():
            if entry.kind == "gpa":
                entries.append(entry)
                continue
            try:
                gpa = memory.gpa_range_of_uva(entry.target, entry.size)
            except UnmappedAddress as exc:
                raise IotlbStateError(
                    f"asid {iotlb.asid} entry iova {entry.iova:#x} size {entry.size:#x}: its "
                    f"target is not one guest physical range of the memory table: {exc}"
                ) from None
            entries.append(IotlbEntry(entry.iova, entry.size, gpa, entry.perm, "gpa"))
        states.append(IotlbState(iotlb.asid, iotlb.default, iotlb.passthrough, tuple(entries)))
    return AddressSpacesState(tuple(asids.group_asid), tuple(states))


def check_restorable(state: AddressSpacesState, asids: AddressSpaces) -> None:
    """Raise ``IotlbStateError`` unless ``state`` can replace what ``asids`` holds."""
    if len(state.iotlbs) != asids.num_asids:
        raise IotlbStateError(
            f"the state has {len(state.iotlbs)} address spaces, this back-end "
            f"{asids.num_asids} (--num-asids)"
        )
    if len(state.group_asid) != asids.num_groups:
        raise IotlbStateError(
            f"the state has {len(state.group_asid)} virtqueue groups, this device "
            f"{asids.num_groups}"
        )
    for saved, iotlb in zip(state.iotlbs, asids.iotlbs):
        # RESET_MAP must bring back what the front-end expects: the same default.
        if saved.default is not iotlb.default:
            raise IotlbStateError(
                f"asid {saved.asid}: default {saved.default.value} on the source, "
                f"{iotlb.default.value} here (--asid-default must match)"
            )
    memory = asids.memory
    if len(memory) == 0:
        return  # resolved against the table the front-end sends later (module docstring)
    for saved in state.iotlbs:
        for entry in saved.entries:
            try:
                memory.views("gpa", entry.target, entry.size)
            except UnmappedAddress as exc:
                raise IotlbStateError(
                    f"asid {saved.asid} entry iova {entry.iova:#x} size {entry.size:#x}: "
                    f"outside this back-end's memory table: {exc}"
                ) from None


def restore(asids: AddressSpaces, state: AddressSpacesState) -> None:
    """Install ``state`` (checked with ``check_restorable`` first)."""
    for saved, iotlb in zip(state.iotlbs, asids.iotlbs, strict=True):
        iotlb.restore(saved.passthrough, saved.entries)
    asids.group_asid = list(state.group_asid)
