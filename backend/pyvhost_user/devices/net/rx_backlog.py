"""Frames that arrived for one RX queue and wait for the guest's buffers.

The packet port's thread appends and signals an eventfd (the queue
worker's wake-up); the queue's worker takes. Bounded: when the guest gives
no buffers (its driver is not up, or it is slower than the traffic), new
frames are dropped and counted, as a NIC drops on a full ring.
"""

from __future__ import annotations

import collections
import os
import threading

DEFAULT_BACKLOG_FRAMES = 1024


class RxBacklog:
    def __init__(self, limit: int = DEFAULT_BACKLOG_FRAMES) -> None:
        self.limit = limit
        self._frames: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def put(self, frame: bytes) -> bool:
        """False (frame dropped) when full."""
        with self._lock:
            if len(self._frames) >= self.limit:
                return False
            self._frames.append(frame)
        os.eventfd_write(self.fd, 1)
        return True

    def take(self) -> bytes | None:
        with self._lock:
            return self._frames.popleft() if self._frames else None

    def __len__(self) -> int:
        return len(self._frames)

    def clear(self) -> int:
        with self._lock:
            dropped = len(self._frames)
            self._frames.clear()
        return dropped

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
