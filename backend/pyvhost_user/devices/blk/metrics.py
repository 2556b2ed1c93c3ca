"""Counters of a virtio-blk device, named after what they count."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class BlkMetrics:
    read_requests: int = 0
    read_bytes: int = 0
    write_requests: int = 0
    write_bytes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    requests_refused: int = 0  # answered with IOERR/UNSUPP
    requests_unanswerable: int = 0  # no status byte: completed with length 0
    io_errors: int = 0  # the image itself failed
    requests_access_denied: int = 0  # a buffer mapped without the permission needed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    # The two counted on every data request: no keyword dict, no getattr.
    def add_read(self, nbytes: int) -> None:
        with self._lock:
            self.read_requests += 1
            self.read_bytes += nbytes

    def add_write(self, nbytes: int) -> None:
        with self._lock:
            self.write_requests += 1
            self.write_bytes += nbytes

    @classmethod
    def counter_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls) if f.name[0] != "_")

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}
