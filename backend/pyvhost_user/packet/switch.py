"""A learning Ethernet switch between back-end processes, over a Unix socket.

The switch listens on a SOCK_SEQPACKET socket: one message is one frame,
so no framing is needed and the kernel keeps frame boundaries. It learns
which port each source MAC came from and sends a frame with a known
unicast destination there only; broadcast, multicast and unknown
destinations are flooded to every other port. A port that cannot take a
frame right now (its socket buffer is full) loses it (counted): one slow
guest must not stall the others, as on a real switch.

Messages shorter than an Ethernet header are the switch's own: on accept it
sends ``HELLO`` so that a port knows it is attached (frames flooded before
that could not have reached it) before its back-end says it is ready.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..unix_socket import listen_unix

log = logging.getLogger(__name__)

HELLO = b"HELLO"
MAX_FRAME = 65536 + 64
ETH_HLEN = 14
SOCKET_BUFFER_BYTES = 4 << 20
ATTACH_TIMEOUT = 10.0


def _enlarge_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


@dataclass
class SwitchCounters:
    frames_in: int = 0
    frames_forwarded: int = 0
    frames_flooded: int = 0
    frames_dropped_port_full: int = 0
    ports_attached: int = 0
    ports_detached: int = 0
    per_port_in: dict[int, int] = field(default_factory=dict)


class SwitchServer:
    """The switch: a thread (or the caller, with ``serve_forever``) moving frames."""

    def __init__(self, path: str, *, mode: int = 0o600) -> None:
        self.path = path
        self.listener = listen_unix(path, mode=mode, backlog=64, kind=socket.SOCK_SEQPACKET)
        self._ports: dict[int, socket.socket] = {}
        self.mac_table: dict[bytes, int] = {}  # MAC -> port fd
        self.counters = SwitchCounters()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> SwitchServer:
        self._thread = threading.Thread(target=self.serve_forever, name="switch", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop:
                try:
                    events = poller.poll()
                except InterruptedError:
                    continue
                for fd, event in events:
                    if fd == self._wake_r:
                        continue
                    if fd == self.listener.fileno():
                        self._attach(poller)
                    else:
                        self._from_port(poller, fd, event)
        finally:
            self._close_all()

    def _attach(self, poller: select.poll) -> None:
        conn, _ = self.listener.accept()
        _enlarge_buffers(conn)
        conn.setblocking(False)
        try:
            conn.send(HELLO)
        except OSError:
            conn.close()
            return
        self._ports[conn.fileno()] = conn
        poller.register(conn.fileno(), select.POLLIN)
        self.counters.ports_attached += 1
        log.info("port %d attached (%d ports)", conn.fileno(), len(self._ports))

    def _detach(self, poller: select.poll, fd: int) -> None:
        poller.unregister(fd)
        self._ports.pop(fd).close()
        for mac in [m for m, port in self.mac_table.items() if port == fd]:
            del self.mac_table[mac]
        self.counters.ports_detached += 1
        log.info("port %d detached (%d ports)", fd, len(self._ports))

    def _from_port(self, poller: select.poll, fd: int, event: int) -> None:
        sock = self._ports[fd]
        # Take what is there now, a bounded batch, so that one port cannot starve the others.
        for _ in range(64):
            try:
                frame = sock.recv(MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                frame = b""
            if not frame:
                self._detach(poller, fd)
                return
            if len(frame) < ETH_HLEN:
                continue  # a control message; ports send none today
            self._forward(fd, frame)

    def _forward(self, source: int, frame: bytes) -> None:
        counters = self.counters
        counters.frames_in += 1
        counters.per_port_in[source] = counters.per_port_in.get(source, 0) + 1
        src, dst = frame[6:12], frame[0:6]
        if not src[0] & 1:
            self.mac_table[src] = source
        target = None if dst[0] & 1 else self.mac_table.get(dst)
        if target is not None:
            if target != source:
                self._send(target, frame)
                counters.frames_forwarded += 1
            return
        counters.frames_flooded += 1
        for fd in list(self._ports):
            if fd != source:
                self._send(fd, frame)

    def _send(self, fd: int, frame: bytes) -> None:
        try:
            self._ports[fd].send(frame)
        except (BlockingIOError, ConnectionError, OSError):
            self.counters.frames_dropped_port_full += 1

    def _close_all(self) -> None:
        for sock in self._ports.values():
            sock.close()
        self._ports.clear()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def close(self, timeout: float = 5.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)


class SwitchPort:
    """One back-end's port on a ``SwitchServer``."""

    def __init__(self, path: str, *, attach_timeout: float = ATTACH_TIMEOUT) -> None:
        self.name = f"switch {path}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        _enlarge_buffers(self.sock)
        try:
            self.sock.settimeout(attach_timeout)
            self.sock.connect(path)
            hello = self.sock.recv(64)
            if hello != HELLO:
                raise ConnectionError(f"{path} is not a switch (said {hello[:16]!r})")
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._deliver: Callable[[bytes], None] | None = None
        self.send_errors = 0

    def start(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name="switch-port", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._deliver is not None
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                frame = self.sock.recv(MAX_FRAME)
            except OSError as exc:
                log.error("%s: receive failed: %s", self.name, exc)
                return
            if not frame:
                log.error("%s: the switch went away", self.name)
                return
            if len(frame) >= ETH_HLEN:
                self._deliver(frame)

    def send(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except OSError as exc:
            self.send_errors += 1
            if self.send_errors == 1:
                log.error("%s: send failed: %s", self.name, exc)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def wait_for_switch(path: str, timeout: float) -> None:
    """Until ``path`` accepts connections (for a switch started as a process)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no switch on {path} after {timeout} s")
        time.sleep(0.01)
