"""What mapping guest memory for DMA costs: nothing, the real thing, or a modelled rate.

A back-end in software maps by address and pays almost nothing per mapping.
Hardware does not: a vDPA device pins every page of a mapped range
(``pin_user_pages``) and programs its own IOMMU, which is what makes a 128 GiB
guest take tens of seconds to map, and what the seed's persistent mappings take
out of the migration downtime. To reproduce that story here, an operator picks:

* ``NONE``: mapping is bookkeeping only (the default);
* ``REAL``: fault in and populate every page of the range
  (``MADV_POPULATE_WRITE``), the part of pinning a process can do itself;
  the cost then grows with memory actually touched, and so does RSS;
* ``SIMULATED``: sleep ``seconds_per_gib`` per GiB mapped, the published
  pinning rate by default (about 7.8 s for 50 GB on mlx5: 0.16 s/GiB), with
  nothing allocated, so 128 GiB guests of sparse memory cost what they would.

The cost is paid where the kernel pays it: synchronously in the request that
maps (an IOTLB UPDATE; the memory table when there is no IOTLB), so the
front-end waits for it. ``reset_map`` is never charged: its being O(1) is the
point, and its measured time is reported next to the map cost.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

GIB = 1 << 30
PUBLISHED_SECONDS_PER_GIB = 0.16  # 7.8 s for 50 GB (mlx5 vDPA pinning, see docs)
MADV_POPULATE_WRITE = 23  # Linux 5.14
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class MapCost(enum.Enum):
    NONE = "none"
    REAL = "real"
    SIMULATED = "simulated"


class MapCostError(OSError):
    """Populating a range failed (out of memory, or a kernel without MADV_POPULATE_WRITE)."""


@dataclass
class MapCostModel:
    kind: MapCost = MapCost.NONE
    seconds_per_gib: float = PUBLISHED_SECONDS_PER_GIB
    maps: int = 0
    bytes_mapped: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.seconds_per_gib <= 3600:
            raise ValueError(f"map cost of {self.seconds_per_gib} s/GiB is not in 0..3600")

    def charge(self, size: int, views: Callable[[], Sequence[memoryview]]) -> float:
        """Pay for mapping ``size`` bytes (``views``: the host memory, for REAL); the seconds."""
        if self.kind is MapCost.NONE or size <= 0:
            return 0.0
        started = time.perf_counter()
        if self.kind is MapCost.SIMULATED:
            time.sleep(size / GIB * self.seconds_per_gib)
        else:
            for view in views():
                populate(view)
        took = time.perf_counter() - started
        with self._lock:
            self.maps += 1
            self.bytes_mapped += size
            self.seconds += took
        return took

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {"map_cost": self.kind.value, "map_cost_seconds_per_gib": self.seconds_per_gib,
                    "map_cost_maps": self.maps, "map_cost_bytes": self.bytes_mapped,
                    "map_cost_seconds": round(self.seconds, 6)}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def populate(view: memoryview) -> None:
    """Fault in every page under a writable view of a shared mapping, as pinning would."""
    if not len(view):
        return
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    start = address - address % PAGE_SIZE
    length = address + len(view) - start
    if _libc.madvise(ctypes.c_void_p(start), length, MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        hint = " (kernel older than 5.14?)" if err == errno.EINVAL else ""
        raise MapCostError(err, f"populating {len(view):#x} bytes failed{hint}: "
                           f"{os.strerror(err)}")
