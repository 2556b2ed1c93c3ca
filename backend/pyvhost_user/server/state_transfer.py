"""Moving a device state through the fd of ``VHOST_USER_SET_DEVICE_STATE_FD``.

The channel behaves like a pipe (vhost-user.rst, "Migrating back-end state"):
the writer writes everything and closes its end; the reader reads until end
of file. Each transfer runs on a thread of its own, so the main channel is
served meanwhile: the front-end writes (load) or reads (save) the pipe while
it waits for nothing from us, and a state larger than the pipe's buffer would
otherwise deadlock the two.

The thread polls the fd together with a private eventfd, and ``finish()``
(called for ``CHECK_DEVICE_STATE``) uses that to end the transfer without a
timeout of any kind:

* save: the front-end asks only once it read to end of file, that is once we
  wrote everything and closed; anything else is a failure, and the thread
  stops at once;
* load: the front-end asks only once it closed its end; the thread then
  drains what is in the channel without waiting, and a transfer that did not
  reach end of file by then failed.

The fd is made non-blocking: a write or read never holds the thread where the
eventfd cannot reach it. ``cancel()`` (the front-end went away, or a new
transfer replaces this one) is ``finish()`` with the outcome ignored.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class TransferError(Exception):
    """The fd cannot be used for the direction asked."""


@dataclass(frozen=True)
class Outcome:
    """How a transfer ended: ``error`` is None on success; ``data``: what a load read."""

    error: str | None
    data: bytes = b""


def _prepare(fd: int, *, write: bool) -> None:
    """Refuse an fd that cannot go the way asked (a pipe's wrong end); make it non-blocking."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise TransferError(f"the fd cannot be inspected: {exc.strerror}") from None
    mode = flags & os.O_ACCMODE
    if write and mode == os.O_RDONLY:
        raise TransferError("the fd is read-only (a pipe's read end?): the back-end writes a save")
    if not write and mode == os.O_WRONLY:
        raise TransferError("the fd is write-only (a pipe's write end?): the back-end reads a load")
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    except OSError as exc:
        raise TransferError(f"the fd cannot be made non-blocking: {exc.strerror}") from None


class _Transfer:
    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._outcome: Outcome | None = None
        self._thread = threading.Thread(target=self._run_and_close, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> Outcome:
        """End the transfer (see the module docstring) and say how it went; idempotent."""
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
            self._thread.join()
            os.close(self._wake)
            self._wake = -1
        assert self._outcome is not None
        return self._outcome

    def cancel(self) -> None:
        self.finish()

    def _run_and_close(self) -> None:
        try:
            outcome = self._run()
        except Exception as exc:  # a bug of ours: fail this transfer, keep the process
            log.exception("device state transfer failed")
            outcome = Outcome(f"internal error: {exc!r}")
        finally:
            self._close_fd()
        self._outcome = outcome

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # for a save: the end of file the front-end reads up to
            self._fd = -1

    def _run(self) -> Outcome:
        raise NotImplementedError

    def _woken(self, timeout_ms: int | None, events: int) -> tuple[bool, bool]:
        """Poll the fd for ``events`` and the eventfd: (fd ready, finish asked)."""
        poller = select.poll()
        poller.register(self._fd, events)
        poller.register(self._wake, select.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        return self._fd in ready, self._wake in ready


class SaveTransfer(_Transfer):
    """Writes ``data`` into the fd, then closes it: the front-end reads until end of file."""

    def __init__(self, fd: int, data: bytes) -> None:
        _prepare(fd, write=True)
        super().__init__(fd, "device-state-save")
        self._data = memoryview(data)

    def _run(self) -> Outcome:
        written = 0
        total = len(self._data)
        while written < total:
            fd_ready, finish = self._woken(None, select.POLLOUT)
            if finish:
                return Outcome(f"CHECK_DEVICE_STATE came after {written} of {total} bytes: the "
                               "front-end did not read the state to its end")
            if not fd_ready:
                continue
            try:
                written += os.write(self._fd, self._data[written : written + CHUNK])
            except BlockingIOError:
                continue
            except OSError as exc:
                why = "the front-end closed its end" if exc.errno == errno.EPIPE else exc.strerror
                return Outcome(f"writing the state failed after {written} of {total} bytes: {why}")
        return Outcome(None)


class LoadTransfer(_Transfer):
    """Reads the fd until end of file, at most ``limit`` bytes."""

    def __init__(self, fd: int, limit: int) -> None:
        _prepare(fd, write=False)
        super().__init__(fd, "device-state-load")
        self._limit = limit
        self._data = bytearray()

    def _run(self) -> Outcome:
        finishing = False
        while True:
            # Once finishing, only what is already in the channel is read.
            fd_ready, finish = self._woken(0 if finishing else None, select.POLLIN)
            finishing = finishing or finish
            if not fd_ready:
                if finishing:
                    return Outcome(f"no end of file after {len(self._data)} bytes: the front-end "
                                   "did not close its end before CHECK_DEVICE_STATE")
                continue
            try:
                chunk = os.read(self._fd, CHUNK)
            except BlockingIOError:
                if finishing:
                    return Outcome(f"no end of file after {len(self._data)} bytes: the front-end "
                                   "did not close its end before CHECK_DEVICE_STATE")
                continue
            except OSError as exc:
                return Outcome(f"reading the state failed after {len(self._data)} bytes: "
                               f"{exc.strerror}")
            if not chunk:
                return Outcome(None, bytes(self._data))
            self._data += chunk
            if len(self._data) > self._limit:
                return Outcome(f"more than {self._limit} bytes: refused unread")


StateTransfer = SaveTransfer | LoadTransfer
