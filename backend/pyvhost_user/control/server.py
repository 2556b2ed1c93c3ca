"""The operator control socket: a Unix stream socket served by its own thread.

``ControlServer(path, target)`` listens on ``path``, greets every client, runs
its commands against a ``ControlTarget`` and pushes the target's events to
every client that completed capabilities negotiation. The protocol itself is
``commands.py``; this module only moves bytes.

Threads: one I/O thread runs a ``selectors`` loop over the listening socket,
the clients and a wake-up pipe. Target methods are called from that thread.
Events may come from any thread: the listener given to ``target.subscribe``
encodes the event at once (a snapshot, stamped with the event's own ``"time"``
when it carries one, else the time the listener was called),
appends it to a bounded queue under a lock and wakes the I/O thread through
the pipe. It never blocks and never raises into the caller.

Slow clients: each client has an output buffer of at most
``max_output_bytes``. While it is over the limit the client's next commands
are not read (a reply is never refused); an event that finds it over the
limit drops the client, with a warning, so one client that stops reading can
neither block the back-end nor delay events to the others.

Socket file: created with ``mode`` (default ``0o600``: only the owner, the
user running the back-end, may connect, since connecting to a Unix socket
needs write permission on it; use e.g. ``0o660`` to let a group in). It is
bound under a temporary name and renamed once listening, so the path appears
only when connecting can succeed. An existing path is replaced only if it is
a stale socket (nobody listening); a live socket or any other file is refused.
``close()`` removes the file (if it is still the one we created).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .commands import (
    MAX_LINE_BYTES,
    NEED_DATA,
    PEER_CLOSED,
    ControlConnection,
    ControlProtocolError,
    Request,
    RequestError,
    StreamError,
    encode_error,
    encode_event,
    event_time,
    execute,
    internal_error,
)
from ..unix_socket import listen_unix
from .target import ControlTarget, Event

log = logging.getLogger("pyvhost_user.control")

DEFAULT_MAX_CLIENTS = 16
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
DEFAULT_MAX_PENDING_EVENTS = 10_000
RECV_BYTES = 65536
_UCRED = struct.Struct("3i")  # pid, uid, gid (SO_PEERCRED)


@dataclass(eq=False)
class _Client:
    number: int
    sock: socket.socket
    conn: ControlConnection
    peer: str
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False  # end of input or fatal error: flush what is queued, then close
    registered_mask: int = 0

    def __str__(self) -> str:
        return f"client {self.number} ({self.peer})"


class ControlServer:
    """Serve the control protocol on the Unix socket ``path`` for ``target``.

    ``start()`` creates the socket (raising ``OSError``/``ValueError`` if it
    cannot) and starts the I/O thread; ``close()`` stops it, disconnects the
    clients, removes the socket file and joins the thread. Usable as a
    context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        target: ControlTarget,
        *,
        mode: int = 0o600,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.target = target
        self.mode = mode
        self.max_clients = max_clients
        self.max_output_bytes = max_output_bytes
        self.max_line_bytes = max_line_bytes
        self.max_pending_events = max_pending_events
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: list[bytes] = []  # encoded events, under _lock
        self._wake_pending = False  # under _lock
        self._closed = False  # under _lock
        self._stop = False
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._wake_r = self._wake_w = -1
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._clients: dict[int, _Client] = {}  # fileno -> client; I/O thread only
        self._next_number = 1
        self._overflow_warned = False
        # Counters (read them from any thread; written by the I/O thread, and
        # events_dropped under _lock).
        self.clients_accepted = 0
        self.clients_dropped = 0  # dropped for not reading (output buffer overflow)
        self.clients_refused = 0  # over max_clients
        self.events_sent = 0  # event lines queued to clients
        self.events_dropped = 0  # events lost because the queue to the I/O thread was full
        self.bad_events = 0  # events the target gave that could not be encoded

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError("ControlServer.start() called twice")
        self._listener = self._listen(self.path, self.mode)
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._unsubscribe = self.target.subscribe(self._on_event)
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"control-server {os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()
        log.info("control socket listening on %s (mode %03o)", self.path, self.mode)

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving; idempotent. Unsubscribes, disconnects, unlinks, joins.

        Not from the I/O thread itself (a target method must not call it).
        """
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("ControlServer.close() called from its own I/O thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
        if self._unsubscribe is not None:
            try:
                self._unsubscribe()
            except Exception:
                log.exception("control: unsubscribing from the target failed")
            self._unsubscribe = None
        self._stop = True
        thread = self._thread
        if thread is not None:
            self._wake()
            thread.join(timeout)
            if thread.is_alive():
                log.error("control: I/O thread did not stop within %.1f s", timeout)
                return  # leave its resources to it rather than closing them under it
        self._release()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- the socket file ------------------------------------------------------------
    def _listen(self, path: str, mode: int) -> socket.socket:
        sock = listen_unix(path, mode=mode, backlog=8)
        sock.setblocking(False)
        st = os.lstat(path)
        self._socket_id = (st.st_dev, st.st_ino)
        return sock

    def _unlink_socket(self) -> None:
        if self._socket_id is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self.path)
            else:
                log.warning("control: %s was replaced by another file; not removing it", self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("control: cannot remove %s: %s", self.path, exc)
        self._socket_id = None

    def _release(self) -> None:
        for client in list(self._clients.values()):
            self._close_client(client, None)
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._unlink_socket()
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    # -- events from other threads --------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        """The target's listener: any thread, never blocks, never raises."""
        try:
            when = event_time(event, self._clock()) if self._clients else 0.0
            if not self._clients:
                return  # nobody to tell; a racing new client only misses this one
            try:
                line = encode_event(event, when)
            except ControlProtocolError as exc:
                self.bad_events += 1
                log.error("control: dropping a malformed event from the target: %s", exc)
                return
            with self._lock:
                if self._closed:
                    return
                if len(self._pending) >= self.max_pending_events:
                    self.events_dropped += 1
                    if not self._overflow_warned:
                        self._overflow_warned = True
                        log.warning(
                            "control: %d events waiting for the I/O thread; dropping new ones",
                            len(self._pending),
                        )
                    return
                self._pending.append(line)
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                self._wake()
        except Exception:  # pragma: no cover - a bug here must not hurt the back-end
            log.exception("control: event listener failed")

    def _wake(self) -> None:
        with self._lock:
            fd = self._wake_w
            if fd < 0:
                return
            try:
                os.write(fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway
            except OSError as exc:  # pragma: no cover
                log.error("control: cannot wake the I/O thread: %s", exc)

    def _take_pending(self) -> list[bytes]:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            lines, self._pending = self._pending, []
            self._wake_pending = False
            self._overflow_warned = False
        return lines

    # -- the I/O thread ----------------------------------------------------------------------
    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stop:
                try:
                    ready = selector.select()
                except InterruptedError:  # pragma: no cover - PEP 475 retries
                    continue
                for key, mask in ready:
                    if self._stop:
                        break
                    try:
                        self._dispatch(key, mask)
                    except Exception:
                        log.exception("control: unexpected error while serving %s", key.data)
                        if isinstance(key.data, _Client):
                            self._close_client(key.data, "internal error")
        except Exception:  # pragma: no cover - the loop itself must not die silently
            log.exception("control: I/O thread failed; the control socket stops")
        finally:
            for client in list(self._clients.values()):
                self._close_client(client, None)
            log.debug("control: I/O thread stopped")

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listener":
            self._accept()
        elif key.data == "wake":
            lines = self._take_pending()
            if lines:
                self._deliver(lines)
        else:
            client = key.data
            if mask & selectors.EVENT_WRITE:
                self._flush(client)
                if client.sock.fileno() >= 0 and len(client.out) <= self.max_output_bytes:
                    # Answer what was buffered while the output was over the limit.
                    self._process(client)
            if mask & selectors.EVENT_READ and client.sock.fileno() >= 0:
                self._read(client)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: log and retry at the next readiness.
                log.error("control: accept failed: %s", exc)
                return
            peer = _peer_description(sock)
            if len(self._clients) >= self.max_clients:
                self.clients_refused += 1
                log.warning("control: refusing %s: already %d clients", peer, len(self._clients))
                try:
                    sock.setblocking(False)
                    sock.send(encode_error(
                        "GenericError", f"too many clients (max {self.max_clients})"
                    ))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(
                self._next_number, sock, ControlConnection(max_line_bytes=self.max_line_bytes), peer
            )
            self._next_number += 1
            self.clients_accepted += 1
            self._clients[sock.fileno()] = client
            client.out += client.conn.data_to_send()  # the greeting
            log.info("control: %s connected", client)
            self._update(client)

    def _read(self, client: _Client) -> None:
        if client.closing:
            return
        try:
            data = client.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close_client(client, f"receive failed: {exc}")
            return
        client.conn.receive_data(data)
        self._process(client)

    def _process(self, client: _Client) -> None:
        """Answer the complete requests buffered, while the output fits under the limit.

        When the output is over the limit, what the socket takes is sent at
        once; if it still is, the rest waits for the socket to be writable
        (the requests stay buffered, and reading stops: back-pressure).
        """
        conn = client.conn
        while not client.closing:
            if len(client.out) > self.max_output_bytes:
                if not self._send_some(client) or len(client.out) > self.max_output_bytes:
                    break
            try:
                request = conn.next_request()
            except RequestError as exc:
                log.info("control: %s: refused: %s", client, exc.desc)
                conn.send_error(exc)
            except StreamError as exc:
                log.warning("control: %s: %s; disconnecting it", client, exc.desc)
                conn.send_error(exc)
                client.out += conn.data_to_send()
                # A stream we cannot trust: one attempt to send the error, then go.
                if self._send_some(client):
                    self._close_client(client, None)
                return
            else:
                if request is NEED_DATA:
                    break
                if request is PEER_CLOSED:
                    client.closing = True
                    break
                assert isinstance(request, Request)
                conn.send(self._execute(client, request))
            client.out += conn.data_to_send()
        client.out += conn.data_to_send()
        self._flush(client)

    def _execute(self, client: _Client, request: Request) -> bytes:
        level = logging.INFO if request.command == "reset-map" else logging.DEBUG
        log.log(level, "control: %s: %s %s", client, request.command, dict(request.arguments))
        try:
            return execute(self.target, request)
        except Exception as exc:
            log.exception("control: %s: %s failed in the target", client, request.command)
            return internal_error(request, exc)

    def _deliver(self, lines: list[bytes]) -> None:
        for client in list(self._clients.values()):
            if client.closing or not client.conn.negotiated:
                continue
            for line in lines:
                if len(client.out) > self.max_output_bytes:
                    if not self._send_some(client):
                        break  # it went away
                    if len(client.out) > self.max_output_bytes:
                        self.clients_dropped += 1
                        self._close_client(
                            client,
                            f"not reading: {len(client.out)} bytes waiting "
                            f"(limit {self.max_output_bytes}); dropped",
                            level=logging.WARNING,
                        )
                        break
                client.out += line
                self.events_sent += 1
            else:
                self._flush(client)

    def _send_some(self, client: _Client) -> bool:
        """Send what the socket takes now; False if the client is gone (closed here)."""
        if client.sock.fileno() < 0:
            return False
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    self._close_client(client, "disconnected")
                else:
                    self._close_client(client, f"send failed: {exc}")
                return False
            del client.out[:sent]
        return True

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes, then close or wait for what comes next."""
        if not self._send_some(client):
            return
        if client.closing and not client.out:
            self._close_client(client, None)
            return
        self._update(client)

    def _update(self, client: _Client) -> None:
        """Register the client for what it is waiting on."""
        assert self._selector is not None
        mask = 0
        if not client.closing and len(client.out) <= self.max_output_bytes:
            mask |= selectors.EVENT_READ
        if client.out:
            mask |= selectors.EVENT_WRITE
        if mask == client.registered_mask:
            return
        if mask == 0:  # pragma: no cover - closing with nothing to send is closed already
            mask = selectors.EVENT_READ
        if client.registered_mask:
            self._selector.modify(client.sock, mask, client)
        else:
            self._selector.register(client.sock, mask, client)
        client.registered_mask = mask

    def _close_client(self, client: _Client, reason: str | None, *,
                      level: int = logging.INFO) -> None:
        fileno = client.sock.fileno()
        if fileno < 0:
            return
        if client.registered_mask and self._selector is not None:
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):  # pragma: no cover
                pass
        client.registered_mask = 0
        self._clients.pop(fileno, None)
        try:
            client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.sock.close()
        if reason:
            log.log(level, "control: %s: %s", client, reason)
        else:
            log.info("control: %s disconnected", client)


def _peer_description(sock: socket.socket) -> str:
    try:
        pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except (OSError, AttributeError, struct.error):
        return "peer unknown"
    return f"pid {pid}, uid {uid}"

