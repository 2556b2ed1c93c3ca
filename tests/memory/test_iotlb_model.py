"""Model-based test of one ASID's IOTLB: an ``Iotlb`` against a brute-force model.

A hypothesis state machine drives an ``Iotlb`` and a deliberately simple
reference model (a plain list of entries, scanned linearly) through random
sequences of UPDATE, INVALIDATE, reset_map and translate probes, with small
address ranges so that overlaps are frequent, sizes of 0, and ranges that
wrap around 2**64. After every step the two must agree on: which updates are
refused, the entries, their count and ``mapped_bytes``, ``is_default`` /
passthrough, and, for every probe, either the exact bytes of the process
reached (compared by address, not by content) or the kind of failure
(``IotlbMiss`` vs ``IotlbAccessDenied`` vs a plain ``UnmappedAddress``) and
the iova at which it happened.

Kernel rules the model encodes (drivers/vhost/vdpa.c, drivers/vhost/iotlb.c,
drivers/vdpa/vdpa_sim/vdpa_sim.c):

* UPDATE: refused when ``size == 0``, when ``iova + size - 1`` passes 2**64,
  when it grants neither read nor write, when its target is not inside the
  memory table, or when it overlaps any entry (-EEXIST). The first accepted
  UPDATE on a passthrough ASID drops the passthrough (vdpasim_dma_map).
* INVALIDATE: ``last = (iova + size - 1) mod 2**64``; nothing when
  ``last < iova``; otherwise every entry overlapping ``[iova, last]`` goes,
  whole, and a passthrough ASID is left empty (vdpasim_dma_unmap).
* reset_map: back to the default (passthrough for IDENTITY, empty for EMPTY).

The run is bounded for CI; set ``PVU_HYPOTHESIS_SCALE=N`` to run N times as
many examples (and twice as many steps when N > 1).
"""

from __future__ import annotations

import ctypes
import functools
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from pyvhost_user.memory import GuestMemory, UnmappedAddress, map_region
from pyvhost_user.memory.iotlb import (
    PERM_READ,
    PERM_WRITE,
    U64_MASK,
    DefaultMapping,
    Iotlb,
    IotlbAccessDenied,
    IotlbEntry,
    IotlbError,
    IotlbMiss,
)

KiB = 1 << 10
MiB = 1 << 20
U64 = 1 << 64
RW = PERM_READ | PERM_WRITE

# Guest memory: two 1 MiB regions of one memfd. Contiguous in the front-end's
# virtual addresses (so an entry may span both), with a hole between them in
# guest physical addresses (so identity probes can fall outside the table).
UVA = 0x7F00_0000_0000
REGIONS = (  # (gpa, size, uva, fd offset)
    (0, 1 * MiB, UVA, 0),
    (2 * MiB, 1 * MiB, UVA + 1 * MiB, 1 * MiB),
)
UVA_END = UVA + 2 * MiB

SCALE = max(1, int(os.environ.get("PVU_HYPOTHESIS_SCALE", "1") or "1"))


@functools.cache
def guest_memory() -> GuestMemory:
    """One memory table for the whole module: the IOTLB never changes it."""
    fd = os.memfd_create("guest-model")
    try:
        os.ftruncate(fd, 2 * MiB)
        mem = GuestMemory()
        for gpa, size, uva, offset in REGIONS:
            mem.add(map_region(fd, gpa, size, uva, offset))
    finally:
        os.close(fd)
    return mem


def _address_of(view: memoryview) -> int:
    """Process address of a (writable, contiguous) view's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@functools.cache
def _region_bases() -> tuple[tuple[int, int, int, int], ...]:
    """(gpa, uva, size, process address) of every region, found once."""
    mem = guest_memory()
    out = []
    for gpa, size, uva, _ in REGIONS:
        out.append((gpa, uva, size, _address_of(mem.view("uva", uva, 1))))
    return tuple(out)


def _runs(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Coalesce (address, length) pieces that follow each other in memory."""
    out: list[tuple[int, int]] = []
    for addr, length in pieces:
        if out and out[-1][0] + out[-1][1] == addr:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((addr, length))
    return out


class Failure(Exception):
    """What the model expects instead of views: an exception kind and where."""

    def __init__(self, kind: type[Exception], iova: int | None) -> None:
        super().__init__(kind.__name__, iova)
        self.kind = kind
        self.iova = iova


class Model:
    """The reference: a list of (iova, last, uaddr, perm), scanned linearly."""

    def __init__(self, default: DefaultMapping) -> None:
        self.default = default
        self.passthrough = default is DefaultMapping.IDENTITY
        self.entries: list[tuple[int, int, int, int]] = []

    @property
    def is_default(self) -> bool:
        return self.passthrough == (self.default is DefaultMapping.IDENTITY) and not self.entries

    @property
    def mapped_bytes(self) -> int:
        return sum(last - iova + 1 for iova, last, _, _ in self.entries)

    def update(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        if size == 0 or iova + size > U64:
            return False
        if not perm & RW:
            return False
        if not (UVA <= uaddr and uaddr + size <= UVA_END):
            return False
        last = iova + size - 1
        # Only an accepted update can drop the passthrough; with passthrough
        # on, there are no entries, so nothing can overlap.
        self.passthrough = False
        for e_iova, e_last, _, _ in self.entries:
            if e_iova <= last and iova <= e_last:
                return False
        self.entries.append((iova, last, uaddr, perm))
        return True

    def invalidate(self, iova: int, size: int) -> int:
        last = (iova + size - 1) & U64_MASK
        if last < iova:
            return 0
        self.passthrough = False
        keep = [e for e in self.entries if not (e[0] <= last and iova <= e[1])]
        removed = len(self.entries) - len(keep)
        self.entries = keep
        return removed

    def reset_map(self) -> None:
        self.entries = []
        self.passthrough = self.default is DefaultMapping.IDENTITY

    def translate(self, iova: int, length: int, perm: int) -> list[tuple[int, int]]:
        """Coalesced (process address, length) runs, or raise ``Failure``."""
        if length == 0:
            return []
        if iova + length > U64:
            raise Failure(IotlbAccessDenied, iova)
        if self.passthrough:
            return _runs(self._process_pieces("gpa", iova, length))
        pieces: list[tuple[int, int]] = []
        cursor, end = iova, iova + length
        while cursor < end:
            hit = [e for e in self.entries if e[0] <= cursor <= e[1]]
            if not hit:
                raise Failure(IotlbMiss, cursor)
            e_iova, e_last, uaddr, e_perm = hit[0]
            if e_perm & perm != perm:
                raise Failure(IotlbAccessDenied, cursor)
            take = min(end, e_last + 1) - cursor
            pieces.extend(self._process_pieces("uva", uaddr + (cursor - e_iova), take))
            cursor += take
        return _runs(pieces)

    @staticmethod
    def _process_pieces(kind: str, addr: int, length: int) -> list[tuple[int, int]]:
        """Byte by region: where [addr, addr+length) of ``kind`` lives in this process."""
        out = []
        cursor, end = addr, addr + length
        while cursor < end:
            for gpa, uva, size, base in _region_bases():
                start = gpa if kind == "gpa" else uva
                if start <= cursor < start + size:
                    take = min(end, start + size) - cursor
                    out.append((base + cursor - start, take))
                    cursor += take
                    break
            else:
                # Identity is "1:1 over the memory table": outside it there is
                # nothing to reach, and nothing the front-end could map either.
                raise Failure(UnmappedAddress, None)
        return out


# -- strategies: small ranges, frequent overlaps, edges of the 64-bit space --------
GRAIN = 0x400

small_addr = st.integers(0, 0x20).map(lambda n: n * GRAIN) | st.integers(0, 0x8000)
top_addr = st.integers(1, 0x20).map(lambda n: U64 - n * GRAIN) | st.integers(U64 - 0x8000, U64_MASK)
edge_addr = st.sampled_from([0, 1, U64_MASK, U64 - GRAIN, 1 * MiB - 1, 1 * MiB, 2 * MiB, 3 * MiB - 1])
region_edge_addr = st.sampled_from([1 * MiB, 2 * MiB, 3 * MiB]).flatmap(
    lambda b: st.integers(b - 0x2000, b + 0x2000)
)
iovas = st.one_of(small_addr, small_addr, top_addr, edge_addr, region_edge_addr)

small_size = st.integers(1, 0x10).map(lambda n: n * GRAIN) | st.integers(1, 0x3000)
sizes = st.one_of(
    st.just(0),
    small_size,
    small_size,
    small_size,
    small_size,
    st.sampled_from([1, U64_MASK, U64 - GRAIN, 2 * MiB, 2 * MiB + 1]),
)
# Invalidate also sees sizes whose end wraps (last < iova) or lands just short.
inval_sizes = sizes | st.integers(U64 - 0x8000, U64_MASK)

valid_uaddr = st.integers(0, 0x40).map(lambda n: UVA + n * GRAIN)
uaddrs = st.one_of(
    valid_uaddr,
    valid_uaddr,
    valid_uaddr,
    valid_uaddr,
    st.integers(UVA + 1 * MiB - 0x2000, UVA + 1 * MiB + 0x100),  # spans both regions
    st.integers(UVA_END - 0x2000, UVA_END + 0x100),  # runs off the end
    st.integers(UVA - 0x1000, UVA),  # starts before the table
    st.integers(0, U64_MASK),
)
perms = st.sampled_from([PERM_READ, PERM_WRITE, RW, RW]) | st.sampled_from([0, 4, 5, 7])
probe_perms = st.sampled_from([PERM_READ, PERM_WRITE, RW])
lengths = st.one_of(
    st.just(0), st.integers(1, 0x3000), st.integers(1, 16), st.integers(1, 16), st.just(U64_MASK)
)


class IotlbMachine(RuleBasedStateMachine):
    DEFAULT: DefaultMapping  # set by the subclasses below

    def __init__(self) -> None:
        super().__init__()
        self.model = Model(self.DEFAULT)
        self.iotlb = Iotlb(3, guest_memory(), self.DEFAULT)

    # -- rules -----------------------------------------------------------------
    def _update(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        before = self.iotlb.generation
        expected = self.model.update(iova, size, uaddr, perm)
        try:
            self.iotlb.update_refusing_overlap(iova, size, uaddr, perm)
        except IotlbError:
            accepted = False
        else:
            accepted = True
        assert accepted == expected, (iova, size, uaddr, perm)
        # A refused update changes nothing a waiter could see.
        assert (self.iotlb.generation > before) == accepted

    @rule(iova=iovas, size=sizes, uaddr=uaddrs, perm=perms)
    def update(self, iova, size, uaddr, perm):
        self._update(iova, size, uaddr, perm)

    @rule(iova=small_addr | top_addr, size=small_size, uaddr=valid_uaddr, perm=probe_perms)
    def update_valid(self, iova, size, uaddr, perm):
        """Well-formed updates, so that entries pile up and overlap is the only refusal."""
        self._update(iova, size, uaddr, perm)

    @precondition(lambda self: self.model.entries)
    @rule(data=st.data(), uaddr=uaddrs, perm=perms)
    def update_over_an_entry(self, data, uaddr, perm):
        """Re-send an existing entry, or one sharing one of its edges: always refused."""
        iova, last, e_uaddr, e_perm = data.draw(st.sampled_from(sorted(self.model.entries)))
        how = data.draw(st.sampled_from(["same", "first byte", "last byte", "around"]))
        if how == "same":
            self._update(iova, last - iova + 1, e_uaddr, e_perm)
        elif how == "first byte":
            self._update(iova, 1, UVA, perm | PERM_READ)
        elif how == "last byte":
            self._update(last, 1, UVA, perm | PERM_READ)
        else:
            start = max(0, iova - GRAIN)
            self._update(start, min(U64, last + GRAIN + 1) - start, UVA, RW)

    @rule(iova=iovas | st.just(0), size=inval_sizes | st.just(0))
    def invalidate(self, iova, size):
        expected = self.model.invalidate(iova, size)
        assert self.iotlb.invalidate_overlapping_whole(iova, size) == expected, (iova, size)

    @precondition(lambda self: self.model.entries)
    @rule(data=st.data())
    def invalidate_an_edge(self, data):
        """Invalidate one byte at an entry's edge: the whole entry must go."""
        iova, last, _, _ = data.draw(st.sampled_from(sorted(self.model.entries)))
        at = data.draw(st.sampled_from([iova, last]))
        assert self.iotlb.invalidate_overlapping_whole(at, 1) == self.model.invalidate(at, 1) == 1

    @rule()
    def reset_map(self):
        self.model.reset_map()
        self.iotlb.reset_map()

    def _probe(self, iova: int, length: int, perm: int) -> None:
        try:
            expected = self.model.translate(iova, length, perm)
        except Failure as failure:
            with pytest.raises(UnmappedAddress) as info:
                self.iotlb.translate(iova, length, perm)
            got = info.value
            if failure.kind is UnmappedAddress:
                assert not isinstance(got, (IotlbMiss, IotlbAccessDenied)), got
            else:
                assert type(got) is failure.kind, (got, failure.kind)
                assert got.iova == failure.iova and got.perm == perm and got.asid == 3
            return
        views = self.iotlb.translate(iova, length, perm)
        assert sum(len(v) for v in views) == length
        assert _runs([(_address_of(v), len(v)) for v in views]) == expected
        if views:
            # And the same bytes, seen through the model's address: a marker.
            marker = bytes([(iova + perm) & 0xFF ^ 0x5A])
            addr, _ = expected[0]
            ctypes.memmove(addr, marker, 1)
            assert bytes(views[0][:1]) == marker

    @rule(iova=iovas, length=lengths, perm=probe_perms)
    def translate(self, iova, length, perm):
        self._probe(iova, length, perm)

    @precondition(lambda self: self.model.entries)
    @rule(data=st.data(), perm=probe_perms)
    def translate_inside_an_entry(self, data, perm):
        """Probes that start on a mapped byte: hits, denials and misses past the end."""
        iova, last, _, _ = data.draw(st.sampled_from(sorted(self.model.entries)))
        start = data.draw(st.integers(iova, last))
        length = data.draw(st.integers(1, min(U64 - start, last - start + 1 + 2 * GRAIN)))
        self._probe(start, length, perm)

    # -- invariants -------------------------------------------------------------
    @invariant()
    def same_state(self):
        model, iotlb = self.model, self.iotlb
        assert iotlb.entries() == [
            IotlbEntry(i, last - i + 1, u, p) for i, last, u, p in sorted(model.entries)
        ]
        assert len(iotlb) == len(model.entries)
        assert iotlb.mapped_bytes == model.mapped_bytes
        assert iotlb.passthrough == model.passthrough
        assert iotlb.is_default == model.is_default
        info = iotlb.describe()
        assert info["entries"] == len(model.entries)
        assert info["state"] == (
            "passthrough" if model.passthrough else ("mapped" if model.entries else "empty")
        )


MACHINE_SETTINGS = settings(
    max_examples=200 * SCALE,
    stateful_step_count=50 * (2 if SCALE > 1 else 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class IdentityDefaultMachine(IotlbMachine):
    DEFAULT = DefaultMapping.IDENTITY


class EmptyDefaultMachine(IotlbMachine):
    DEFAULT = DefaultMapping.EMPTY


TestIotlbModelIdentityDefault = IdentityDefaultMachine.TestCase
TestIotlbModelIdentityDefault.settings = MACHINE_SETTINGS
TestIotlbModelEmptyDefault = EmptyDefaultMachine.TestCase
TestIotlbModelEmptyDefault.settings = MACHINE_SETTINGS


# -- the model itself, pinned on hand-checked cases ---------------------------------
# Entries at 0x10 and at 2**64-1; which does each INVALIDATE remove (kernel arithmetic)?
@pytest.mark.parametrize(
    ("iova", "size", "removed"),
    [
        pytest.param(0, 0, 2, id="0+0-covers-everything"),
        pytest.param(0x1000, 0, 0, id="size0-elsewhere-wraps-to-nothing"),
        pytest.param(U64 - 0x1000, 0x2000, 0, id="end-wraps-below-start"),
        pytest.param(U64 - 0x1000, 0x1000, 1, id="ends-exactly-at-top"),
        pytest.param(0x10, 1, 1, id="one-byte"),
        pytest.param(0x11, U64_MASK - 0x11, 0, id="between-the-two"),
    ],
)
def test_model_invalidate_follows_kernel_arithmetic(iova, size, removed):
    model = Model(DefaultMapping.EMPTY)
    assert model.update(0x10, 1, UVA, RW)
    assert model.update(U64 - 1, 1, UVA, RW)
    assert model.invalidate(iova, size) == removed
    assert len(model.entries) == 2 - removed
