"""One thread per started virtqueue.

The worker waits on the ring's kick eventfd and a private stop eventfd,
drains the ring through the device, and signals the call eventfd when the
driver asked for it. ``stop()`` returns only after the worker has finished
the request it is on and written its completion: every request popped before
GET_VRING_BASE is completed before the answer goes out, and nothing touches
guest memory afterwards.

Why threads and not asyncio: the device's image calls (preadv/pwritev,
fdatasync) block and release the GIL; with asyncio they would go to a thread
pool anyway, and a thread per queue keeps the hot path free of hand-offs.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from ..devices.base import Device
from ..virtqueue import BadChain, QueueConfig, QueueCorrupted, SplitQueue, signal_eventfd

log = logging.getLogger(__name__)


class QueueWorker:
    def __init__(
        self,
        queue: SplitQueue,
        config: QueueConfig,
        device: Device,
        call_lock: threading.Lock,
        on_broken: Callable[[int, str], None],
    ) -> None:
        self.queue = queue
        self.config = config
        self.device = device
        self._call_lock = call_lock
        self._on_broken = on_broken
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._enabled = threading.Event()
        if config.enabled:
            self._enabled.set()
        self.completed = 0
        self._thread = threading.Thread(
            target=self._run, name=f"vq{queue.index}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def set_enabled(self, enabled: bool) -> None:
        if enabled:
            self._enabled.set()
            # Work kicked while the ring was disabled is waiting: wake the loop.
            os.eventfd_write(self._stop_fd, 1)
        else:
            self._enabled.clear()

    def stop(self) -> int:
        """Stop after the request in progress; return the next avail index to serve."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join()
        os.close(self._stop_fd)
        return self.queue.last_avail_idx

    _stopping = False

    def _run(self) -> None:
        kick_fd = self.config.kick_fd
        poller = select.poll()
        if kick_fd is not None:
            poller.register(kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        # Anything made available before we started (a reconnect, a kick we
        # missed) is served without waiting for a new kick.
        try:
            self._drain()
            while not self._stopping:
                for fd, _events in poller.poll():
                    if fd == self._stop_fd:
                        try:
                            os.eventfd_read(self._stop_fd)
                        except BlockingIOError:
                            pass
                    elif fd == kick_fd:
                        try:
                            os.eventfd_read(kick_fd)
                        except (BlockingIOError, OSError):
                            pass
                if self._stopping:
                    break
                self._drain()
        except (BadChain, QueueCorrupted) as exc:
            self._break(str(exc))
        except Exception as exc:  # a bug: keep the process alive, show it
            log.exception("queue %d: worker failed", self.queue.index)
            self._break(f"internal error: {exc!r}")

    def _drain(self) -> None:
        queue = self.queue
        while self._enabled.is_set() and not self._stopping:
            served = 0
            while not self._stopping:
                chain = queue.pop()
                if chain is None:
                    break
                used_len = self.device.process(queue.index, chain)
                queue.push_used(chain.head, used_len)
                served += 1
            if served:
                self.completed += served
                self._notify()
            queue.enable_notifications()
            # Re-check after publishing avail_event: a chain made available
            # between the last pop and that write would otherwise wait for a
            # kick the driver was told it need not send.
            if not queue.pending():
                return

    def _notify(self) -> None:
        if self.queue.needs_notification():
            with self._call_lock:
                signal_eventfd(self.config.call_fd)

    def _break(self, reason: str) -> None:
        log.error(
            "queue %d: marked broken (device needs reset): %s", self.queue.index, reason
        )
        self._on_broken(self.queue.index, reason)
