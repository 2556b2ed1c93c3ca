"""Descriptor chains, checked once when built.

``walk_chain`` follows a split-ring chain from its head (through an indirect
table when there is one) and returns a ``DescriptorChain`` whose buffers are
already translated to zero-copy views: device-readable ones first, then
device-writable ones. Everything the driver controls is checked here, so the
device only ever sees a well-formed chain:

* every ``next`` index inside the table, and no more descriptors than the
  table holds (which is what catches loops);
* an indirect descriptor only when INDIRECT_DESC was negotiated, never chained
  with NEXT, never inside an indirect table, with a length that is a non-zero
  multiple of 16;
* no device-readable descriptor after a device-writable one;
* every buffer inside guest memory (or the IOTLB), with the permission the
  device needs, and totals that fit in 32 bits.

Behind an IOTLB two outcomes are not faults of the chain: a miss
(``IotlbMiss`` propagates: the caller asks the front-end and walks again) and
a mapping without the permission needed, which is recorded on the chain
(``access_denied``) so the device can fail that one request with an error
status, the way a real IOMMU fault fails a DMA, instead of touching memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from ..memory.address_space import AddressSpace
from ..memory.errors import GuestMemoryError
from ..memory.iotlb import IotlbAccessDenied, IotlbMiss
from .errors import BadChain

DESC: Final = struct.Struct("<QIHH")
DESC_SIZE: Final = DESC.size  # 16
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
U32_LIMIT: Final = 1 << 32


@dataclass(slots=True)
class DescriptorChain:
    """A walked chain: its head index and its buffers as views, by direction."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0
    descriptor_count: int = 0
    access_denied: IotlbAccessDenied | None = None  # first buffer the IOTLB refused
    last_writable_denied: bool = False  # the status byte's buffer itself was refused


def walk_chain(
    head: int,
    table: memoryview,
    queue_size: int,
    buffers: AddressSpace,
    *,
    indirect_allowed: bool,
    table_space: AddressSpace | None = None,
) -> DescriptorChain:
    """Build the chain starting at ``head`` of the descriptor ``table``.

    ``buffers`` translates buffer addresses; ``table_space`` translates the
    address of an indirect table (the same space as buffers in practice).
    Raises ``BadChain``.
    """
    if head >= queue_size:
        raise BadChain(head, f"head index {head} >= queue size {queue_size}")
    chain = DescriptorChain(head)
    index = head
    budget = queue_size  # a chain longer than the table must loop
    in_indirect = False
    limit = queue_size
    current_table = table
    while True:
        if budget == 0:
            raise BadChain(head, "descriptor loop (chain longer than its table)")
        budget -= 1
        addr, length, flags, next_index = DESC.unpack_from(current_table, index * DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if in_indirect:
                raise BadChain(head, "indirect descriptor inside an indirect table")
            if not indirect_allowed:
                raise BadChain(head, "indirect descriptor without INDIRECT_DESC negotiated")
            if flags & VIRTQ_DESC_F_NEXT:
                raise BadChain(head, "indirect descriptor with NEXT set")
            if length == 0 or length % DESC_SIZE:
                raise BadChain(head, f"indirect table length {length} is not a multiple of 16")
            if chain.descriptor_count:
                raise BadChain(head, "indirect descriptor after direct descriptors")
            current_table = indirect_table_view(chain, table_space or buffers, addr, length)
            in_indirect = True
            limit = length // DESC_SIZE
            budget = limit
            index = 0
            continue
        add_buffer(chain, buffers, addr, length, bool(flags & VIRTQ_DESC_F_WRITE),
                   "descriptor {}", index)
        if not flags & VIRTQ_DESC_F_NEXT:
            return chain
        if next_index >= limit:
            raise BadChain(head, f"next index {next_index} >= table size {limit}")
        index = next_index


# -- shared by both ring layouts (split here, packed in packed.py) -------------
def indirect_table_view(
    chain: DescriptorChain, space: AddressSpace, addr: int, length: int
) -> memoryview:
    """The indirect table ``addr``/``length`` names, read-only (its length already checked)."""
    try:
        return space.view(addr, length, write=False)
    except IotlbMiss:
        raise
    except GuestMemoryError as exc:
        raise BadChain(chain.head, f"indirect table: {exc}") from None


def add_buffer(
    chain: DescriptorChain,
    buffers: AddressSpace,
    addr: int,
    length: int,
    write: bool,
    where: str,
    number: int,
) -> None:
    """Append one descriptor's buffer to ``chain`` as views, with the checks every
    layout shares: readable before writable, inside memory (or the IOTLB, with the
    permission needed), totals below 2**32. ``where.format(number)`` names the
    descriptor in errors (formatted only then: this runs for every buffer)."""
    head = chain.head
    if not write and chain.writable_len:
        raise BadChain(head, "device-readable descriptor after a writable one")
    if length:
        try:
            views = buffers.views(addr, length, write=write)
        except IotlbMiss:
            raise
        except IotlbAccessDenied as exc:
            chain.access_denied = chain.access_denied or exc
            views = []
        except GuestMemoryError as exc:
            raise BadChain(head, f"{where.format(number)}: {exc}") from None
        if write:
            chain.writable.extend(views)
            chain.writable_len += length
            chain.last_writable_denied = not views
            if chain.writable_len >= U32_LIMIT:
                raise BadChain(head, "writable length overflows 32 bits")
        else:
            chain.readable.extend(views)
            chain.readable_len += length
            if chain.readable_len >= U32_LIMIT:
                raise BadChain(head, "readable length overflows 32 bits")
    chain.descriptor_count += 1
