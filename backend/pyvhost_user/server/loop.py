"""The socket side: listen, serve one front-end at a time, stop on a signal.

This is the only module that touches the vhost-user socket. It reads with
``recvmsg`` (header and fds together), feeds the sans-IO ``MessageReader``,
hands each message to the ``Session`` and writes the replies with
``sendmsg``. A front-end that breaks the framing or disappears ends its
session (rings stopped, fds and mappings released); the next one is served.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..devices.base import Device
from ..recorder import FlightRecorder
from ..unix_socket import listen_unix
from ..wire import (
    NEED_DATA,
    FramingError,
    MalformedMessage,
    Message,
    MessageReader,
    close_all,
    encode_message,
    request_name,
)
from .options import BackendOptions
from .session import Disconnect, Session

EventListener = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)
trace = logging.getLogger("pyvhost_user.trace")

# Room for more fds than the protocol allows, so a flood is seen (and
# refused) instead of silently truncated by the kernel.
FD_SPACE = socket.CMSG_SPACE(32 * array.array("i").itemsize)


def recv_with_fds(sock: socket.socket, nbytes: int) -> tuple[bytes, list[int]]:
    data, ancdata, msg_flags, _addr = sock.recvmsg(nbytes, FD_SPACE)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    if msg_flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise FramingError("control data truncated: the peer sent too many fds")
    for fd in fds:
        os.set_inheritable(fd, False)
    return data, fds


def send_message(sock: socket.socket, message: Message) -> None:
    data, fds = encode_message(message)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


class StopRequested(Exception):
    pass


# Flight-recorder category of each control event (the rest are life-cycle steps).
EVENT_CATEGORY = {"MAP": "mapping", "UNMAP": "mapping", "RESET_MAP": "mapping"}


def _summary(message: Message, limit: int = 240) -> str:
    text = str(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BackendServer:
    """Serves a device to one front-end at a time on a Unix socket."""

    def __init__(
        self,
        device: Device,
        *,
        socket_path: str | None = None,
        fd: int | None = None,
        socket_mode: int = 0o600,
        socket_group: str | None = None,
        on_listening: Callable[[], None] | None = None,
        options: BackendOptions | None = None,
        recorder: FlightRecorder | None = None,
    ) -> None:
        if (socket_path is None) == (fd is None):
            raise ValueError("exactly one of socket_path and fd")
        self.device = device
        self.options = options or BackendOptions()
        self.recorder = recorder if recorder is not None else FlightRecorder()
        self.socket_path = socket_path
        # Held while a vhost-user message is handled; the control socket takes
        # it too, so an operator's reset-map never interleaves with a message.
        self.lock = threading.RLock()
        self._listeners: list[EventListener] = []
        self._listeners_lock = threading.Lock()
        self._on_listening = on_listening
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self.sessions_served = 0
        self.session: Session | None = None
        self._owns_socket_file = False
        if socket_path is not None:
            self.listener: socket.socket | None = self._listen(socket_path, socket_mode, socket_group)
            self._inherited_connection: socket.socket | None = None
        else:
            assert fd is not None
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX:
                raise ValueError(f"--fd {fd} is not a Unix socket")
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            self.listener = sock if listening else None
            self._inherited_connection = None if listening else sock

    def _listen(self, path: str, mode: int, group: str | None) -> socket.socket:
        sock = listen_unix(path, mode=mode, backlog=4, group=group)
        self._owns_socket_file = True
        return sock

    # -- signals -------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.route_signals_to_wakeup()

    def route_signals_to_wakeup(self) -> None:
        """Make a signal wake the main loop even when another thread receives it.

        The kernel may deliver SIGTERM to any thread (a queue worker, the control
        socket's); the main thread, blocked in poll(), would then sleep on and
        the Python handler would not run. With the wake-up pipe as the signal
        wake-up fd, the C-level handler writes to it and poll() returns. Main
        thread only.
        """
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.request_stop()

    def request_stop(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # -- serving -------------------------------------------------------------
    def serve_forever(self) -> None:
        if self._on_listening:
            self._on_listening()
        try:
            if self._inherited_connection is not None:
                self._serve_connection(self._inherited_connection)
                return
            assert self.listener is not None
            log.info("listening on %s", self.socket_path or f"fd {self.listener.fileno()}")
            while not self._stop:
                ready = self._wait([self.listener.fileno()])
                if self.listener.fileno() in ready:
                    conn, _ = self.listener.accept()
                    self._serve_connection(conn)
        except StopRequested:
            pass
        finally:
            self.close()

    def _wait(self, fds: list[int]) -> set[int]:
        poller = select.poll()
        for fd in [*fds, self._wake_r]:
            poller.register(fd, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            ready = {fd for fd, _ in events}
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            if self._stop:
                raise StopRequested
            ready.discard(self._wake_r)
            if ready:
                return ready

    def _serve_connection(self, conn: socket.socket) -> None:
        self.sessions_served += 1
        number = self.sessions_served
        log.info("front-end %d connected", number)
        session = Session(self.device, options=self.options, events=self.emit,
                          recorder=self.recorder)
        with self.lock:
            self.session = session
        self.emit("FRONT_END_CONNECTED", {"number": number})
        reader = MessageReader()
        reason = "closed by the front-end"
        try:
            while True:
                ready = self._wait_connection(conn)
                if ready == "second":
                    continue
                # One message at a time, header first: see wire/codec.py on fds.
                data, fds = recv_with_fds(conn, reader.bytes_needed() or 12)
                if not data:
                    close_all(fds)
                    if reader.buffered_bytes:
                        reason = f"closed by the front-end mid-message ({reader.buffered_bytes} bytes pending)"
                    break
                reader.receive(data, fds)
                while True:
                    try:
                        message = reader.next_message()
                    except MalformedMessage as exc:
                        log.error("malformed message refused: %s", exc)
                        for answer in session.refuse_malformed(exc.request, exc.flags):
                            self._send(conn, answer)
                        continue
                    if message is NEED_DATA:
                        break
                    assert isinstance(message, Message)
                    trace.debug("<- %s", message)
                    started = time.monotonic_ns()
                    with self.lock:
                        answers = session.handle(message)
                    self._record_request(message, answers, started)
                    for answer in answers:
                        self._send(conn, answer)
        except FramingError as exc:
            reason = f"protocol framing broken: {exc}"
            log.error("front-end %d: %s", number, reason)
        except Disconnect as exc:
            reason = str(exc)
            log.error("front-end %d: %s", number, reason)
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                reason = f"connection lost: {exc.strerror}"
            else:
                reason = f"socket error: {exc}"
                log.error("front-end %d: %s", number, reason)
        except StopRequested:
            reason = "back-end stopping"
            raise
        except Exception as exc:
            # A bug of ours: the session is dropped, the process serves the next one.
            log.exception("front-end %d: internal error", number)
            reason = f"internal error: {exc!r}"
        finally:
            reader.close()
            with self.lock:
                session.close()
                self.session = None
            conn.close()
            log.info("front-end %d disconnected: %s", number, reason)
            self.emit("FRONT_END_DISCONNECTED", {"number": number, "reason": reason})

    def _wait_connection(self, conn: socket.socket) -> str:
        fds = [conn.fileno()]
        if self.listener is not None:
            fds.append(self.listener.fileno())
        ready = self._wait(fds)
        if conn.fileno() in ready:
            # Served first: when a front-end closes and the next one connects at
            # once, the close must end this session before the newcomer is judged.
            return "data"
        if self._peer_has_closed(conn):
            return "data"
        assert self.listener is not None
        other, _ = self.listener.accept()
        other.close()
        log.warning("refused a second front-end: one is already connected")
        return "second"

    @staticmethod
    def _peer_has_closed(conn: socket.socket) -> bool:
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _record_request(self, message: Message, answers: list[Message], started: int) -> None:
        """One span per request, with what was asked and answered (as the trace shows them)."""
        args: dict[str, Any] = {"request": _summary(message)}
        if answers:
            args["answer"] = "; ".join(_summary(a) for a in answers)
        self.recorder.complete("vhost-user", request_name(message.request), started,
                               time.monotonic_ns(), **args)

    # -- events (control socket) -------------------------------------------
    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        with self._listeners_lock:
            self._listeners.append(listener)

        return lambda: self.unsubscribe(listener)

    def unsubscribe(self, listener: EventListener) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Called from any thread; listeners must not block."""
        event = {"event": name, "data": data, "time": time.time()}
        self.recorder.instant(EVENT_CATEGORY.get(name, "life-cycle"), name, **data)
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    def _send(self, conn: socket.socket, message: Message) -> None:
        trace.debug("-> %s", message)
        try:
            send_message(conn, message)
        finally:
            message.close_fds()  # ours to give: the kernel gave the peer its own copies

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._owns_socket_file and self.socket_path:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            self._owns_socket_file = False
        if threading.current_thread() is threading.main_thread():
            try:
                signal.set_wakeup_fd(-1)  # the pipe is about to close
            except ValueError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
