"""A ring's worker loop in a process of its own (``--queue-workers processes``).

Threads of one Python process share one GIL: busy rings get one CPU's worth of
Python between them, and every image call that releases the GIL hands it to
another ring's thread and back, a futex round trip each time. A process per
ring runs each loop on its own CPU (scripts/bench_blk.py measures both).

The child is forked when the ring starts and runs the same loop as a thread
worker (``QueueWorker._run``), on what it inherited at that moment: the
mappings of guest memory (shared), the image fd, the ring's eventfds, the
inflight buffer. What changes afterwards in the parent does not reach it, so
the session stops a process-backed ring before any request that changes those
(eventfds, enable, the memory table, features, the dirty log) and starts it
again after, from the index the child reported; and it never uses a process
while an IOTLB or the dirty log is in use (both change under a running ring).

The stop request is a byte of a shared anonymous page, checked between
requests, plus a write to the loop's stop eventfd to wake it. The child
reports over a pipe, one JSON line each: its first completion (the flight
recorder's FIRST_IO), a ring it found broken (the session marks it and
signals the error eventfd), its counters every second (so the control
socket's statistics stay live), and last its final state (the base to resume
from, the requests served, the device's counters). A child that dies without that
report leaves a split ring to be served again from the used index (what it had
taken and not completed is made available again, and the inflight buffer, when
negotiated, has the exact record); a packed ring has no such index in memory
and is marked broken.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import mmap
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..devices.base import Device
from ..virtqueue import PackedQueue, QueueConfig, SplitQueue
from .queue_worker import QueueWorker

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# A child still busy this long after being asked to stop is killed (a flush on
# a dying disk can take long; a child that never answers must not hang the session).
STOP_TIMEOUT_SECONDS = 60.0
PROGRESS_SECONDS = 1.0  # how often a child sends its counters
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class ProcessQueueWorker:
    """The same interface as ``QueueWorker`` (start, stop, completed), loop in a child."""

    def __init__(
        self,
        queue: SplitQueue | PackedQueue,
        config: QueueConfig,
        device: Device,
        on_broken: Callable[[int, str], None],
        on_first_completion: Callable[[int, float], None] | None = None,
        *,
        io_threads: int = 0,
    ) -> None:
        self.queue = queue
        self.config = config
        self.device = device
        self._on_broken = on_broken
        self._on_first_completion = on_first_completion
        self._stop_page = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and shared: seen by the child
        self._stop_view = memoryview(self._stop_page)
        # Built here, run in the child: its stop eventfd is inherited by both.
        self._loop = QueueWorker(
            queue, config, device, threading.Lock(), self._child_broken,
            on_first_completion=self._child_first_completion,
            io_threads=io_threads, stop_flag=self._stop_view[:1],
        )
        self.completed = 0
        self.misses = 0
        self.pid: int | None = None
        self._report_fd: int | None = None
        self._final: dict[str, Any] | None = None
        self._reports = b""  # what came from the child and is not a whole line yet
        self._reports_ended = threading.Event()  # the child's end of the pipe is closed
        self._reported: dict[str, int] = {}  # in the child: the counters sent so far

    # -- parent ------------------------------------------------------------
    def start(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                os.close(read_fd)
                self._report_fd = write_fd
                self._child_main(parent)
                code = 0
            except BaseException:
                try:
                    log.exception("queue %d: worker process failed", self.queue.index)
                except BaseException:
                    pass
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        _report_reader().add(read_fd, self)
        log.debug("queue %d: worker process %d started", self.queue.index, pid)

    def set_enabled(self, enabled: bool) -> None:
        # The session restarts a process-backed ring instead (it cannot reach the child).
        raise RuntimeError("a worker process is restarted, not re-enabled")

    def stop(self) -> int:
        """Stop after the request in progress; return the base to resume from (GET_VRING_BASE)."""
        assert self.pid is not None
        self._stop_view[0] = 1
        os.eventfd_write(self._loop._stop_fd, 1)
        if not self._reports_ended.wait(STOP_TIMEOUT_SECONDS):  # set at the child's exit (EOF)
            log.error("queue %d: worker process %d did not stop in %.0f s: killing it",
                      self.queue.index, self.pid, STOP_TIMEOUT_SECONDS)
            os.kill(self.pid, signal.SIGKILL)
            self._reports_ended.wait()
        _pid, status = os.waitpid(self.pid, 0)
        os.close(self._loop._stop_fd)
        # The shared page goes now, not at some later garbage collection (the
        # loop and this object refer to each other): leak checks count mappings.
        self._loop._stop_flag.release()
        self._stop_view.release()
        self._stop_page.close()
        # Likewise the loop (its callbacks are this object's methods): it holds
        # views of guest memory, which keep the regions mapped until it goes.
        self._loop = None  # type: ignore[assignment]
        final = self._final
        if final is None:
            how = _describe_status(status)
            if isinstance(self.queue, SplitQueue):
                used = self.queue.used16[1]
                log.error(
                    "queue %d: worker process %d ended (%s) without its report: the ring "
                    "is served again from its used index %d", self.queue.index, self.pid, how, used,
                )
                return used
            # A packed ring keeps no used index in memory to start again from.
            reason = f"worker process {self.pid} ended ({how}) without its report"
            log.error("queue %d: %s", self.queue.index, reason)
            self._on_broken(self.queue.index, reason)
            return self.config.base
        self.completed = final["completed"]
        self.misses = final["misses"]
        self.device.add_counters(final["counters"])
        return int(final["vring_base"])

    def _take_reports(self, chunk: bytes) -> None:
        """Called by the report reader with what the child wrote."""
        index = self.queue.index
        *lines, self._reports = (self._reports + chunk).split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError as exc:
                log.error("queue %d: unreadable report from worker process %s: %s", index,
                          self.pid, exc)
                continue
            if "first_completion" in report and self._on_first_completion is not None:
                self._on_first_completion(index, report["first_completion"])
            elif "broken" in report:
                self._on_broken(index, report["broken"])
            elif "counters" in report:
                self.device.add_counters(report["counters"])
            elif "final" in report:
                self._final = report["final"]

    # -- child -------------------------------------------------------------
    def _child_main(self, parent: int) -> None:
        # Die with the back-end: a worker must never outlive the process that
        # answers the front-end (it would go on writing guest memory).
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            return
        # The back-end's handlers are for the back-end: Ctrl-C in a terminal
        # reaches the whole process group, and the back-end stops its rings.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        _fresh_log_handlers()
        # Count from zero with fresh locks (another thread may have held the
        # parent's at the fork); the parent adds what we report.
        self.device.start_private_counters()
        loop = self._loop
        loop._started_at = time.monotonic()
        done = threading.Event()
        progress = threading.Thread(target=self._report_progress, args=(done,), daemon=True)
        progress.start()
        loop._run()
        loop.finish_offloaded()
        done.set()
        progress.join()
        self._report({"final": {
            "vring_base": loop.queue.vring_base,
            "completed": loop.completed,
            "misses": loop.misses,
            "counters": self._counters_since_last_report(),
        }})

    def _counters_since_last_report(self) -> dict[str, int]:
        now = self.device.private_counters()
        delta = {k: v - self._reported.get(k, 0) for k, v in now.items() if v != self._reported.get(k, 0)}
        self._reported = now
        return delta

    def _report_progress(self, done: threading.Event) -> None:
        """Every second, what was counted since the last report: the back-end's
        statistics (control socket) stay live while the ring runs here."""
        while not done.wait(PROGRESS_SECONDS):
            delta = self._counters_since_last_report()
            if delta:
                self._report({"counters": delta})

    def _report(self, message: dict[str, Any]) -> None:
        assert self._report_fd is not None
        data = json.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(self._report_fd, data):]

    def _child_broken(self, index: int, reason: str) -> None:
        self._report({"broken": reason})

    def _child_first_completion(self, index: int, after_start: float) -> None:
        self._report({"first_completion": after_start})


class _ReportReader:
    """One thread reads the reports of every worker process.

    A thread per child would come and go with every ring restart, and each
    thread's stack is a mapping of its own (the leak checks count mappings).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._workers: dict[int, ProcessQueueWorker] = {}
        threading.Thread(target=self._run, name="worker-reports", daemon=True).start()

    def add(self, fd: int, worker: ProcessQueueWorker) -> None:
        with self._lock:
            self._workers[fd] = worker
        os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        while True:
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            with self._lock:
                for fd in self._workers:
                    poller.register(fd, select.POLLIN)
            # No reference to a worker is held while waiting: a stopped one must
            # go (with its views of guest memory) as soon as its ring drops it.
            for fd, _events in poller.poll():
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                else:
                    self._read(fd)

    def _read(self, fd: int) -> None:
        with self._lock:
            worker = self._workers[fd]
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            log.error("queue %d: reading the worker process's reports failed: %s",
                      worker.queue.index, exc)
            chunk = b""
        if chunk:
            worker._take_reports(chunk)
            return
        with self._lock:  # end of file: the child has exited
            del self._workers[fd]
        os.close(fd)
        worker._reports_ended.set()


_reader: _ReportReader | None = None
_reader_lock = threading.Lock()


def _report_reader() -> _ReportReader:
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = _ReportReader()
        return _reader


def _fresh_log_handlers() -> None:
    """Log to a new stream on the same stderr: the inherited handlers' stream may
    have been locked by another thread of the parent at the fork."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    if formatter is not None:
        handler.setFormatter(formatter)
    root.addHandler(handler)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"
