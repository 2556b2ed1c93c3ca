"""The ring buffer of timestamped events.

Recording must cost next to nothing where it happens (the dispatcher, a queue
worker): an event is one tuple appended to a bounded ``deque`` (atomic in
CPython, so no lock), the oldest dropped when it is full. Timestamps are
``CLOCK_MONOTONIC`` nanoseconds, the clock every process on the machine
shares, so traces of a front-end and a back-end line up when merged.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

# About half a kilobyte an event: 20,000 keep a vIOMMU guest's boot (a miss and an
# update per page it touches) in ~10 MiB.
DEFAULT_CAPACITY = 20_000


class Event(NamedTuple):
    ts_ns: int  # CLOCK_MONOTONIC
    dur_ns: int | None  # None: an instant
    category: str  # "vhost-user", "life-cycle", "mapping", "io", "vmm", ...
    name: str
    thread: str
    args: dict[str, Any]


class FlightRecorder:
    """Keeps the last ``capacity`` events; thread-safe for recording."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, process: str = "back-end") -> None:
        if capacity < 1:
            raise ValueError(f"flight recorder capacity {capacity} is not positive")
        self.capacity = capacity
        self.process = process
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self.recorded = 0  # ever, including those the ring buffer has dropped since
        self.started_ns = time.monotonic_ns()
        self.started_wall = time.time()

    @property
    def dropped(self) -> int:
        return self.recorded - len(self._events)

    def instant(self, category: str, name: str, **args: Any) -> None:
        self._append(Event(time.monotonic_ns(), None, category, name, _thread(), args))

    def complete(self, category: str, name: str, start_ns: int, end_ns: int, **args: Any) -> None:
        """A span that already happened (``start_ns``/``end_ns`` from ``time.monotonic_ns``)."""
        self._append(Event(start_ns, max(0, end_ns - start_ns), category, name, _thread(), args))

    @contextmanager
    def span(self, category: str, name: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Record the ``with`` block as one span; the yielded dict takes more args."""
        start = time.monotonic_ns()
        try:
            yield args
        finally:
            self.complete(category, name, start, time.monotonic_ns(), **args)

    def _append(self, event: Event) -> None:
        self._events.append(event)
        self.recorded += 1  # a lost increment under a race only skews the dropped count

    def events(self, last: int | None = None) -> list[Event]:
        """The kept events in time order (the last ``last`` of them if given)."""
        snapshot = list(self._events)  # deque iteration is not safe under appends; list() is
        snapshot.sort(key=lambda e: e.ts_ns)  # spans are appended at their end
        return snapshot if last is None else snapshot[-last:] if last > 0 else []

    def describe(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "kept": len(self._events), "recorded": self.recorded,
                "dropped": self.dropped, "process": self.process}


def _thread() -> str:
    return threading.current_thread().name
