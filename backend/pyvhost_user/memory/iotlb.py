"""One device IOTLB per address space (ASID): IOVA -> front-end virtual address.

(Entries restored from a migrated device state point at guest physical
addresses instead: see ``IotlbEntry`` and iotlb_state.py.)

The rules mirror Linux vhost/vDPA (``drivers/vhost/vdpa.c``,
``drivers/vdpa/vdpa_sim/vdpa_sim.c``), each in a method named after it:

* an UPDATE that overlaps an entry already in the ASID is refused
  (``-EEXIST`` in the kernel): entries never silently replace each other;
* an INVALIDATE removes every entry it overlaps, whole (entries are not
  split), and a range that wraps does nothing, as in the kernel;
* invalidating everything leaves the ASID *empty*, which is not its default;
* ``reset_map`` puts the ASID back in its default state in O(1): for the
  identity default that is one "passthrough" flag (iova == guest physical
  address over the whole memory table), as vdpa_sim keeps it, so resetting
  costs the same whatever was mapped;
* the first UPDATE on a passthrough ASID drops the passthrough first.

Entries live in a ``SortedKeyList`` (sortedcontainers) keyed by IOVA: map,
lookup and invalidate are O(log n) up to millions of entries, where plain
list insertion would move the whole table on every UPDATE.
"""

from __future__ import annotations

import bisect

import enum
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sortedcontainers import SortedKeyList

from .errors import GuestMemoryError, UnmappedAddress
from .guest_memory import AddressKind, GuestMemory

U64_MASK = (1 << 64) - 1
PERM_READ = 1
PERM_WRITE = 2


class DefaultMapping(enum.Enum):
    """What an ASID holds after creation and after reset_map."""

    IDENTITY = "identity"  # 1:1 over the memory table (an on-chip IOMMU's initial state)
    EMPTY = "empty"  # nothing: every access misses to the front-end (a guest vIOMMU)


class IotlbError(GuestMemoryError):
    """An IOTLB update or invalidate the rules refuse."""


class IotlbMiss(UnmappedAddress):
    """No entry covers the address with the permission needed: ask the front-end."""

    def __init__(self, asid: int, iova: int, length: int, perm: int, detail: str) -> None:
        super().__init__(f"iova(asid {asid})", iova, length, detail)
        self.asid = asid
        self.iova = iova
        self.perm = perm


class IotlbAccessDenied(UnmappedAddress):
    """An entry covers the address but without the permission needed."""

    def __init__(self, asid: int, iova: int, length: int, perm: int, detail: str) -> None:
        super().__init__(f"iova(asid {asid})", iova, length, detail)
        self.asid = asid
        self.iova = iova
        self.perm = perm


@dataclass(frozen=True, slots=True)
class IotlbEntry:
    """``[iova, iova+size)`` -> ``target``, with ``perm``.

    ``kind`` says what ``target`` is: "uva", a front-end user address (what an
    UPDATE carries), or "gpa", a guest physical address (entries restored from
    a migrated device state, where the source's user addresses mean nothing:
    see iotlb_state.py). Both resolve through the memory table at each
    translation, so a "gpa" entry follows whatever table the destination has.
    """

    iova: int
    size: int
    target: int
    perm: int
    kind: AddressKind = "uva"

    @property
    def last(self) -> int:
        return self.iova + self.size - 1


_reaper_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
_reaper_started = threading.Lock()
_reaper: threading.Thread | None = None


VIEW_CACHE_MAX = 16384  # buffers remembered per ring (a few MiB of views at most)
CACHE_PAGE_SHIFT = 12
CACHE_MAX_PAGES = 1 << 20  # 4 GiB of 4 KiB pages: then it starts over


def _retire(table: object) -> None:
    """Drop ``table`` on a background thread: deallocating it is O(n) and must not
    make reset_map (or a persistent reset) cost time in the mapped size."""
    global _reaper
    with _reaper_started:
        if _reaper is None:
            _reaper = threading.Thread(target=_reap_forever, name="iotlb-reaper", daemon=True)
            _reaper.start()
    _reaper_queue.put(table)


def _reap_forever() -> None:
    while True:
        table = _reaper_queue.get()
        del table


def _floor_entry(table: SortedKeyList, key: int) -> IotlbEntry | None:
    """The entry with the greatest IOVA <= ``key``, or None: O(log n).

    SortedKeyList's own way (bisect_key_right, then table[i]) goes through its
    positional index, which costs microseconds in Python; this reads its
    sublists directly (sortedcontainers 2.4's layout: ``_maxes`` holds each
    sublist's greatest key, ``_keys`` and ``_lists`` the sublists; the version
    is pinned, and tests/memory checks this against the public way)."""
    maxes = table._maxes
    if not maxes:
        return None
    pos = bisect.bisect_right(maxes, key)  # the first sublist with a key above ``key``
    if pos == len(maxes):
        return table._lists[-1][-1]
    idx = bisect.bisect_right(table._keys[pos], key)
    if idx:
        return table._lists[pos][idx - 1]
    return table._lists[pos - 1][-1] if pos else None


def _new_table() -> SortedKeyList:
    return SortedKeyList(key=_iova_of)


def _iova_of(entry: IotlbEntry) -> int:
    return entry.iova


class Iotlb:
    """The IOTLB of one ASID. Thread-safe: workers translate while the dispatcher updates."""

    def __init__(self, asid: int, memory: GuestMemory, default: DefaultMapping) -> None:
        self.asid = asid
        self.memory = memory
        self.default = default
        self.passthrough = default is DefaultMapping.IDENTITY
        self._entries: SortedKeyList = _new_table()
        # What a hardware IOTLB is to its page table: page number -> the entry
        # that covered it last time. A hit skips the sorted table's search (a few
        # microseconds in Python at 64k entries, three times a request); any
        # change of the table empties it.
        # page -> (first iova, last iova, perm, kind, target - iova) of its entry
        self._cache: dict[int, tuple[int, int, int, str, int]] = {}
        self._cached = 0  # pages put in the cache since it was last emptied
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # waiters for an UPDATE after a miss
        self.generation = 0
        self.mapped_bytes = 0
        self.touched = False  # changed by the front-end since it connected
        self.translations = 0
        self.misses = 0
        self.access_denials = 0

    # -- state ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def is_default(self) -> bool:
        return self.passthrough == (self.default is DefaultMapping.IDENTITY) and not self._entries

    def entries(self) -> list[IotlbEntry]:
        with self._lock:
            return list(self._entries)

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {
                "asid": self.asid,
                "default": self.default.value,
                "state": "passthrough" if self.passthrough else ("empty" if not self._entries else "mapped"),
                "entries": len(self._entries),
                "mapped_bytes": self.memory.total_bytes() if self.passthrough else self.mapped_bytes,
                "translations": self.translations,
                "misses": self.misses,
                "access_denials": self.access_denials,
            }

    # -- kernel rules ----------------------------------------------------------
    def update_refusing_overlap(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        """Add an entry; refuse one that overlaps an existing entry (kernel: -EEXIST)."""
        if size == 0 or iova + size - 1 > U64_MASK:
            raise IotlbError(f"asid {self.asid}: update {iova:#x}+{size:#x} is empty or wraps")
        if not perm & (PERM_READ | PERM_WRITE):
            raise IotlbError(f"asid {self.asid}: update {iova:#x}+{size:#x} grants no access")
        # "Addresses and size must be within vhost memory regions" (vhost-user.rst)
        try:
            self.memory.views("uva", uaddr, size)
        except UnmappedAddress as exc:
            raise IotlbError(f"asid {self.asid}: update target {exc}") from None
        entry = IotlbEntry(iova, size, uaddr, perm)
        with self._lock:
            if self.passthrough:
                # vdpa_sim: the first real mapping replaces the identity one.
                self.passthrough = False
            clash = self._first_overlap(iova, entry.last)
            if clash is not None:
                raise IotlbError(
                    f"asid {self.asid}: update {iova:#x}-{entry.last:#x} overlaps entry "
                    f"{clash.iova:#x}-{clash.last:#x}"
                )
            self._entries.add(entry)
            self.mapped_bytes += size
            self._changed()

    def invalidate_overlapping_whole(self, iova: int, size: int) -> int:
        """Remove every entry overlapping the range, whole; return how many.

        The range is ``[iova, iova + size - 1]`` computed modulo 2**64, as the
        kernel does: ``iova=0, size=0`` covers everything, a range whose end
        wraps below its start covers nothing.
        """
        last = (iova + size - 1) & U64_MASK
        with self._lock:
            if self.passthrough and last >= iova:
                # Invalidating any part of the identity map leaves the ASID empty.
                self.passthrough = False
            if last < iova:
                return 0
            lo = self._entries.bisect_key_left(iova)
            if lo > 0 and self._entries[lo - 1].last >= iova:
                lo -= 1
            hi = self._entries.bisect_key_right(last)
            removed = self._entries[lo:hi]
            del self._entries[lo:hi]
            self.mapped_bytes -= sum(e.size for e in removed)
            self._changed()
            return len(removed)

    def reset_map(self) -> None:
        """Back to the default state, in O(1) whatever is mapped (the seed's .reset_map)."""
        with self._lock:
            old, self._entries = self._entries, _new_table()
            _retire(old)  # O(1) here: freeing a million entries is the reaper's work
            self.mapped_bytes = 0
            self.passthrough = self.default is DefaultMapping.IDENTITY
            self._changed(touch=False)  # back at its default: nothing left to undo

    def restore(self, passthrough: bool, entries: Sequence[IotlbEntry]) -> None:
        """Replace the whole table (a migrated device state), in one step.

        ``entries`` must be sorted by IOVA, non-overlapping, each non-empty and
        not wrapping, and passthrough comes with no entries (iotlb_state.py
        checks all of it first); they are re-checked here because a wrong table
        would translate silently.
        """
        previous_last = -1
        for entry in entries:
            if entry.size <= 0 or entry.last > U64_MASK or entry.iova <= previous_last:
                raise IotlbError(f"asid {self.asid}: restored entry {entry} is empty, wraps "
                                 "or overlaps the one before")
            previous_last = entry.last
        if passthrough and entries:
            raise IotlbError(f"asid {self.asid}: passthrough with {len(entries)} entries")
        table = _new_table()
        table.update(entries)
        with self._lock:
            old, self._entries = self._entries, table
            _retire(old)
            self.mapped_bytes = sum(e.size for e in entries)
            self.passthrough = passthrough
            # A state that is this ASID's default leaves nothing to undo on disconnect.
            self._changed(touch=not self.is_default)

    def _drop_cache(self) -> None:
        # Replaced, never emptied, and counted rather than measured: a reset must
        # not even look at the old containers (a reader may hold them).
        old, self._cache = self._cache, {}
        if self._cached:
            self._cached = 0
            _retire(old)  # freeing a large dict is O(n): not in the request that changed the table

    def _changed(self, *, touch: bool = True) -> None:
        self._drop_cache()
        self.generation += 1
        self.touched = touch
        self.changed.notify_all()

    def has_entry(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        """Whether exactly this entry is already mapped (a repeated UPDATE)."""
        with self._lock:
            i = self._entries.bisect_key_left(iova)
            return i < len(self._entries) and self._entries[i] == IotlbEntry(iova, size, uaddr, perm)

    def _first_overlap(self, iova: int, last: int) -> IotlbEntry | None:
        entry = _floor_entry(self._entries, last)
        if entry is not None and entry.last >= iova:
            return entry
        return None

    # -- translation -------------------------------------------------------------
    def translate(self, iova: int, length: int, perm: int) -> list[memoryview]:
        """Views of ``[iova, iova+length)`` if entries grant ``perm``; else raise.

        Raises ``IotlbMiss`` (nothing mapped there: ask the front-end) or
        ``IotlbAccessDenied`` (mapped without the permission: the request fails).
        """
        if length == 0:
            return []
        if iova + length - 1 > U64_MASK:
            raise IotlbAccessDenied(self.asid, iova, length, perm, "range wraps past 2**64")
        with self._lock:
            self.translations += 1
            if self.passthrough:
                pieces = [("gpa", iova, length)]
            else:
                hit = self._cache.get(iova >> CACHE_PAGE_SHIFT)
                if hit is not None:
                    first, last, granted, kind, delta = hit
                    if first <= iova and iova + length - 1 <= last and granted & perm == perm:
                        return self.memory.views(kind, iova + delta, length)
                pieces = self._resolve(iova, length, perm)
        out: list[memoryview] = []
        for kind, addr, size in pieces:
            out.extend(self.memory.views(kind, addr, size))  # type: ignore[arg-type]
        return out

    def _resolve(self, iova: int, length: int, perm: int) -> list[tuple[str, int, int]]:
        pieces: list[tuple[str, int, int]] = []
        cursor, remaining = iova, length
        while remaining:
            entry = _floor_entry(self._entries, cursor)
            if entry is None or entry.last < cursor:
                self.misses += 1
                raise IotlbMiss(self.asid, cursor, remaining, perm, "no entry")
            if entry.perm & perm != perm:
                self.access_denials += 1
                raise IotlbAccessDenied(
                    self.asid, cursor, remaining, perm,
                    f"entry {entry.iova:#x}-{entry.last:#x} grants perm {entry.perm}, needs {perm}",
                )
            take = min(remaining, entry.last - cursor + 1)
            pieces.append((entry.kind, entry.target + (cursor - entry.iova), take))
            if self._cached >= CACHE_MAX_PAGES:
                self._drop_cache()
            last = entry.last
            self._cache[cursor >> CACHE_PAGE_SHIFT] = (
                entry.iova, last, entry.perm, entry.kind, entry.target - entry.iova)
            self._cached += 1
            cursor += take
            remaining -= take
        return pieces


class IotlbSpace:
    """An ``AddressSpace`` that reads guest memory through one ASID's IOTLB."""

    def __init__(self, iotlb: Iotlb) -> None:
        self.iotlb = iotlb
        self.memory = iotlb.memory
        self.name = f"iova(asid {iotlb.asid})"
        # (iova, length, write) -> the views a translation gave, while neither the
        # IOTLB nor the memory table has changed since. One space per ring, so
        # one thread: a driver reuses its buffers' IOVAs (Linux's IOVA caches),
        # and a repeat costs a dict look-up instead of a translation and a slice.
        self._views: dict[tuple[int, int, bool], list[memoryview]] = {}
        self._views_of = (-1, -1)

    @property
    def generation(self) -> int:
        # An IOTLB change or a memory-table change can both move a translation.
        return (self.iotlb.generation << 32) | self.iotlb.memory.generation

    def views(self, addr: int, length: int, *, write: bool) -> list[memoryview]:
        iotlb = self.iotlb
        now = (iotlb.generation, self.memory.generation)
        if now != self._views_of:
            self._views = {}
            self._views_of = now
        key = (addr, length, write)
        views = self._views.get(key)
        if views is not None:
            iotlb.translations += 1  # a statistic: an increment lost to a race is harmless
            return views
        views = iotlb.translate(addr, length, PERM_WRITE if write else PERM_READ)
        if len(self._views) >= VIEW_CACHE_MAX:
            self._views = {}
        self._views[key] = views  # never mutated by callers: they extend their own lists
        return views

    def view(self, addr: int, length: int, *, write: bool) -> memoryview:
        parts = self.views(addr, length, write=write)
        if len(parts) != 1:
            if not parts:
                return memoryview(b"")
            raise UnmappedAddress(self.name, addr, length, "range is not contiguous in memory")
        return parts[0]
