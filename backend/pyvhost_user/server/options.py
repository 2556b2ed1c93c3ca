"""Back-end settings an operator chooses (the CLI fills them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..memory.iotlb import DefaultMapping
from ..memory.map_cost import PUBLISHED_SECONDS_PER_GIB, MapCost
from ..memory.peer_fd import SealPolicy


class IotlbPersist(enum.Enum):
    """What a device reset does to the IOTLBs.

    NEGOTIATED: keep them only for a front-end that acked the IOTLB_PERSIST
    extension bit; reset them for any other (the safe legacy behaviour: QEMU
    sends no invalidation when a guest reboots, so kept entries would be stale).
    ALWAYS: keep them even for a stock front-end (knowingly unsafe; warned).
    NEVER: reset them even when the front-end asked to keep them.
    """

    NEGOTIATED = "negotiated"
    ALWAYS = "always"
    NEVER = "never"


class QueueWorkers(enum.Enum):
    """Where a started ring's worker loop runs.

    THREADS: a thread of this process per ring; the rings share one GIL.
    PROCESSES: a process per ring, forked when the ring starts, so rings run
    on several CPUs (scripts/bench_blk.py: 1.7x the IOPS of threads with four
    queues busy; the same with one). Only while nothing the loop depends on can change under
    it without a restart: no IOTLB (ACCESS_PLATFORM), no dirty logging; a ring
    falls back to a thread otherwise, and is restarted when its eventfds, its
    enable state or the memory table change.
    """

    THREADS = "threads"
    PROCESSES = "processes"
    AUTO = "auto"  # processes for a device with several queues that allows them, else threads


@dataclass(frozen=True)
class BackendOptions:
    num_asids: int = 2
    # Default mapping of every ASID for a front-end that speaks the address-space
    # extension. A stock front-end that negotiates ACCESS_PLATFORM has a guest
    # vIOMMU behind it: its ASID 0 is always EMPTY (identity would bypass it).
    asid_default: DefaultMapping = DefaultMapping.IDENTITY
    iotlb_persist: IotlbPersist = IotlbPersist.NEGOTIATED
    # Files the front-end sends to be mapped (guest memory, dirty log, inflight
    # buffer) are sealed against shrinking where possible; REQUIRE refuses the others.
    memory_seal: SealPolicy = SealPolicy.TRY
    # What mapping for DMA costs (memory/map_cost.py): none, real (populate the
    # pages) or simulated at a rate, to reproduce hardware's pinning times.
    map_cost: MapCost = MapCost.NONE
    map_cost_seconds_per_gib: float = PUBLISHED_SECONDS_PER_GIB
    # Per started ring: threads that serve its large requests and flushes
    # (server/queue_worker.py); 0 serves everything on the ring's own worker.
    io_threads: int = 0
    # Where each ring's worker loop runs (server/queue_process.py).
    queue_workers: QueueWorkers = QueueWorkers.AUTO

    def __post_init__(self) -> None:
        if not 0 <= self.map_cost_seconds_per_gib <= 3600:
            raise ValueError(f"--map-cost-rate {self.map_cost_seconds_per_gib} is not in 0..3600")
        if not 0 <= self.io_threads <= 64:
            raise ValueError(f"--io-threads {self.io_threads} is not in 0..64")
        if not 1 <= self.num_asids <= 64:
            raise ValueError(f"--num-asids {self.num_asids} is not in 1..64")
