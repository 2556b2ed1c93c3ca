"""Counters of the net device, named after what they count."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class NetMetrics:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped_malformed: int = 0   # shorter than a header + Ethernet header
    tx_dropped_offload: int = 0     # asked for checksum/GSO we never offered
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_filtered: int = 0            # refused by the RX filter (modes, MAC, VLAN)
    rx_dropped_backlog_full: int = 0  # the guest gave no buffers in time
    rx_dropped_too_big: int = 0     # larger than the buffer the guest gave
    rx_dropped_runt: int = 0        # shorter than an Ethernet header
    ctrl_commands: int = 0
    ctrl_refused: int = 0
    chains_access_denied: int = 0
    rarps_sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
