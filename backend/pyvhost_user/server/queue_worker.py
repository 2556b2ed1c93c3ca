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

Large requests and flushes can go to a small pool of I/O threads
(``io_threads``): a 1 MiB copy between the page cache and guest memory takes
tens of microseconds with the GIL released, so a few of them in parallel use
more than one CPU, while the worker goes on popping. Small requests stay
inline: handing one to another thread costs more than serving it. Completions
from the pool are published under the worker's used-ring lock, in whatever
order they finish (virtio allows it; the inflight record is per head).

The loop runs the same in a worker process (``queue_process.py``): the stop
request is a flag in memory the owner can share with a child process.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..devices.base import Device
from ..memory.dirty_log import DirtyLog, buffer_address
from ..memory.guest_memory import GuestMemory
from ..memory.iotlb import Iotlb, IotlbMiss
from ..virtqueue import (
    BadChain,
    DescriptorChain,
    InvalidQueueConfig,
    PackedQueue,
    QueueConfig,
    QueueCorrupted,
    SplitQueue,
    signal_eventfd,
)

log = logging.getLogger(__name__)

# An IOTLB miss is sent to the front-end again after this long without the
# translation arriving, and the ring is given up as broken after the last.
MISS_RESEND_SECONDS = 1.0
MISS_GIVE_UP_SECONDS = 10.0
# Requests carrying at least this much data go to the I/O threads, when there are any.
DEFAULT_OFFLOAD_BYTES = 64 << 10


class TranslationSource(Protocol):
    """Where a worker gets missing IOTLB entries from (the session)."""

    def iotlb(self, asid: int) -> Iotlb: ...

    def send_miss(self, asid: int, iova: int, perm: int) -> bool:
        """Ask the front-end for a translation; False when there is no channel to ask on."""

    def send_access_fail(self, asid: int, iova: int, perm: int) -> bool:
        """Tell the front-end its IOTLB refused a device access."""

    def dirty_log(self) -> DirtyLog | None:
        """The log to mark guest writes in, while the front-end asks for it (LOG_ALL)."""

    @property
    def memory(self) -> GuestMemory: ...


class QueueWorker:
    def __init__(
        self,
        queue: SplitQueue | PackedQueue,
        config: QueueConfig,
        device: Device,
        call_lock: threading.Lock,
        on_broken: Callable[[int, str], None],
        translations: TranslationSource | None = None,
        on_first_completion: Callable[[int, float], None] | None = None,
        *,
        io_threads: int = 0,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
        stop_flag: memoryview | bytearray | None = None,
    ) -> None:
        self.queue = queue
        self.config = config
        self.device = device
        self._call_lock = call_lock
        self._on_broken = on_broken
        self._translations = translations
        self._waiting_on: Iotlb | None = None
        self.misses = 0
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._enabled = threading.Event()
        if config.enabled:
            self._enabled.set()
        self.completed = 0
        # Called once, from the worker, with (queue, seconds since start): the
        # "first I/O" step of a restart, which the flight recorder times.
        self._on_first_completion = on_first_completion
        self._started_at = 0.0
        # Made at start: a loop run in a worker process never starts it, and an
        # unstarted thread would keep this object (and its views of guest
        # memory, so the mappings) alive until a garbage collection.
        self._thread: threading.Thread | None = None
        # Byte 0 set: stop after the request in progress. A shared page when the
        # loop runs in another process, checked once per request either way.
        self._stop_flag = stop_flag if stop_flag is not None else bytearray(1)
        self._io_threads = io_threads
        self._offload_bytes = offload_bytes
        self._used_lock = threading.Lock()  # the used ring, when I/O threads complete too
        self._pool: list[threading.Thread] = []
        self._jobs: queue_module.SimpleQueue[DescriptorChain | None] = queue_module.SimpleQueue()
        self._offloaded = 0  # handed to the pool, not yet on the used ring
        self._pool_idle = threading.Condition(self._used_lock)

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"vq{self.queue.index}", daemon=True)
        self._thread.start()
        self.device.queue_ready(self.queue.index, self._enabled.is_set())

    def set_enabled(self, enabled: bool) -> None:
        if enabled:
            self._enabled.set()
            # Work kicked while the ring was disabled is waiting: wake the loop.
            os.eventfd_write(self._stop_fd, 1)
        else:
            self._enabled.clear()
        self.device.queue_ready(self.queue.index, enabled)

    def stop(self) -> int:
        """Stop after the request in progress; return the base to resume from (GET_VRING_BASE)."""
        self.device.queue_ready(self.queue.index, False)
        self._stop_flag[0] = 1
        os.eventfd_write(self._stop_fd, 1)
        waiting_on = self._waiting_on
        if waiting_on is not None:  # blocked on a miss: the chain stays unconsumed
            with waiting_on.changed:
                waiting_on.changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.finish_offloaded()
        os.close(self._stop_fd)
        return self.queue.vring_base

    @property
    def _stopping(self) -> bool:
        return self._stop_flag[0] != 0

    def finish_offloaded(self) -> None:
        """Wait until every request handed to the I/O threads is on the used ring
        (and signalled), then end the threads."""
        with self._pool_idle:
            self._pool_idle.wait_for(lambda: self._offloaded == 0)
        for _ in self._pool:
            self._jobs.put(None)
        for thread in self._pool:
            thread.join()
        self._pool.clear()

    def _run(self) -> None:
        kick_fd = self.config.kick_fd
        poller = select.poll()
        if kick_fd is not None:
            poller.register(kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        # A queue the device fills (net RX) also wakes when the device has work.
        work_fd = self.device.work_fd(self.queue.index)
        if work_fd is not None:
            poller.register(work_fd, select.POLLIN)
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
                    elif fd == kick_fd or fd == work_fd:
                        try:
                            os.eventfd_read(fd)
                        except (BlockingIOError, OSError):
                            pass
                if self._stopping:
                    break
                self._drain()
        except (BadChain, QueueCorrupted, InvalidQueueConfig) as exc:
            self._break(str(exc))
        except Exception as exc:  # a bug: keep the process alive, show it
            log.exception("queue %d: worker failed", self.queue.index)
            self._break(f"internal error: {exc!r}")

    def _drain(self) -> None:
        queue = self.queue
        while self._enabled.is_set() and not self._stopping:
            try:
                queue.ensure_rings()
                self._serve_available()
            except IotlbMiss as miss:
                self._notify()  # what completed before the miss is not held back
                self._await_translation(miss)
                continue
            self._notify()
            queue.enable_notifications()
            # Re-check after publishing avail_event: a chain made available
            # between the last pop and that write would otherwise wait for a
            # kick the driver was told it need not send. Buffers with no work
            # for them (RX, nothing arrived) wait for the device's work fd.
            if not queue.pending() or not self.device.has_work(queue.index):
                return

    def _serve_available(self) -> None:
        queue = self.queue
        process = self.device.process
        has_work = self.device.has_work  # False: a queue the device fills has nothing for it
        offload_at = self._offload_bytes if self._io_threads else None
        while not self._stopping and has_work(queue.index):
            chain = queue.pop()
            if chain is None:
                return
            if offload_at is not None and (
                chain.readable_len + chain.writable_len >= offload_at or self.device.blocks(chain)
            ):
                self._offload(chain)
                continue
            used_len = process(queue.index, chain)
            if self._pool:
                with self._used_lock:
                    self._complete(chain, used_len)
            else:
                self._complete(chain, used_len)

    _unsignalled = 0

    def _complete(self, chain: DescriptorChain, used_len: int) -> None:
        """Put a served chain on the used ring (the caller holds the used lock
        whenever I/O threads exist)."""
        denied = chain.access_denied
        if denied is not None and self._translations is not None:
            self._translations.send_access_fail(denied.asid, denied.iova, denied.perm)
        if self._translations is not None:
            log = self._translations.dirty_log()
            if log is not None:
                self._log_writes(log, chain.writable)
        self.queue.push_used(chain.head, used_len)
        self._unsignalled += 1

    # -- the I/O threads -------------------------------------------------------
    def _offload(self, chain: DescriptorChain) -> None:
        if len(self._pool) < self._io_threads:
            thread = threading.Thread(target=self._io_thread, daemon=True,
                                      name=f"vq{self.queue.index}-io{len(self._pool)}")
            self._pool.append(thread)
            thread.start()
        with self._used_lock:
            self._offloaded += 1
        self._jobs.put(chain)

    def _io_thread(self) -> None:
        index = self.queue.index
        while True:
            chain = self._jobs.get()
            if chain is None:
                return
            try:
                used_len = self.device.process(index, chain)
            except Exception as exc:  # a bug: the ring cannot be trusted any more
                log.exception("queue %d: I/O thread failed", index)
                used_len = 0
                self._break(f"internal error: {exc!r}")
            with self._used_lock:
                try:
                    self._complete(chain, used_len)
                    self._notify_locked()
                finally:
                    self._offloaded -= 1
                    if not self._offloaded:
                        self._pool_idle.notify_all()

    def _log_writes(self, log: DirtyLog, written: list[memoryview]) -> None:
        """Mark every guest page this request may have written, and the used ring,
        before the used index moves (migration reads the log after GET_VRING_BASE)."""
        assert self._translations is not None
        memory = self._translations.memory
        for view in written:
            gpa = memory.gpa_of_host_address(buffer_address(view))
            if gpa is not None:
                log.mark(gpa, len(view))
        if self.config.log_used:
            # log_guest_addr is the used ring's (packed: device area's) guest physical
            # address, also behind an IOTLB; the whole ring is a page or two.
            for gpa, length in self.queue.ring_log_ranges(self.config.log_guest_addr, memory):
                log.mark(gpa, length)

    def _await_translation(self, miss: IotlbMiss) -> None:
        """Ask the front-end for ``miss`` and wait for the IOTLB to change (or a stop)."""
        if self._translations is None:
            raise QueueCorrupted(f"queue {self.queue.index}: {miss} and no IOTLB to ask")
        iotlb = self._translations.iotlb(miss.asid)
        give_up = time.monotonic() + MISS_GIVE_UP_SECONDS
        self._waiting_on = iotlb
        try:
            asked = warned = False
            while not self._stopping:
                generation = iotlb.generation
                self.misses += 1
                log.debug("queue %d: IOTLB miss asid %d iova %#x perm %d",
                          self.queue.index, miss.asid, miss.iova, miss.perm)
                if self._translations.send_miss(miss.asid, miss.iova, miss.perm):
                    asked = True
                elif not warned:
                    warned = True
                    # No way to ask (no backend-request channel, or an ASID a MISS
                    # cannot name): the front-end may still map it on its own.
                    log.warning(
                        "queue %d: waiting for the front-end to map iova %#x (asid %d); "
                        "no miss can be sent for it", self.queue.index, miss.iova, miss.asid,
                    )
                with iotlb.changed:
                    iotlb.changed.wait_for(
                        lambda: iotlb.generation != generation or self._stopping,
                        timeout=MISS_RESEND_SECONDS,
                    )
                if iotlb.generation != generation:
                    return
                if time.monotonic() > give_up:
                    raise QueueCorrupted(
                        f"queue {self.queue.index}: the front-end never mapped iova "
                        f"{miss.iova:#x} (asid {miss.asid}) in {MISS_GIVE_UP_SECONDS:.0f} s"
                        + ("" if asked else "; no miss could be sent for it")
                    )
        finally:
            self._waiting_on = None

    def _notify(self) -> None:
        if self._pool:
            with self._used_lock:
                self._notify_locked()
        else:
            self._notify_locked()

    def _notify_locked(self) -> None:
        if not self._unsignalled:
            return
        if not self.completed and self._on_first_completion is not None:
            self._on_first_completion(self.queue.index, time.monotonic() - self._started_at)
        self.completed += self._unsignalled
        self._unsignalled = 0
        if self.queue.needs_notification():
            with self._call_lock:
                signal_eventfd(self.config.call_fd)

    def _break(self, reason: str) -> None:
        log.error(
            "queue %d: marked broken (device needs reset): %s", self.queue.index, reason
        )
        self._on_broken(self.queue.index, reason)
