"""A small blocking client of the control socket (``vhost-user-ctl`` uses it).

    with ControlClient("/run/vhost-user-blk.ctl") as client:
        spaces = client.execute("query-address-spaces", {"entries": True})
        event = client.next_event(timeout=5)

Events that arrive while a reply is awaited are kept for ``next_event``.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import time
from typing import Any

from .commands import (
    NEED_DATA,
    NO_ID,
    PEER_CLOSED,
    ClientConnection,
    ControlProtocolError,
    ErrorReply,
    EventMessage,
    Greeting,
    Return,
    ServerMessage,
    encode_command,
)


class ControlClientError(ControlProtocolError):
    """Base of the client's errors."""


class ConnectionFailed(ControlClientError):
    """Could not connect to the control socket."""


class ConnectionLost(ControlClientError):
    """The server closed the connection, or it broke."""


class ResponseTimeout(ControlClientError):
    """No answer within the timeout."""


class CommandFailed(ControlClientError):
    """The server answered with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class ControlClient:
    """Connect, read the greeting and (unless ``negotiate=False``) negotiate capabilities."""

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float | None = 10.0, negotiate: bool = True
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._conn = ClientConnection()
        self._events: collections.deque[EventMessage] = collections.deque()
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise ConnectionFailed(f"cannot connect to {self.path}: {_reason(exc)}") from None
        try:
            first = self._receive(timeout)
            if not isinstance(first, Greeting):
                raise ControlClientError(f"expected a greeting, got {first!r:.200}")
            self.greeting: Greeting = first
            if negotiate:
                self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    # -- life cycle ---------------------------------------------------------------
    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- commands -------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its value; ``CommandFailed`` on an error reply."""
        request_id = next(self._ids)
        reply = self.request(encode_command(command, arguments, request_id), request_id)
        if isinstance(reply, ErrorReply):
            raise CommandFailed(command, reply.error_class, reply.desc)
        return reply.value

    def request(self, line: bytes, request_id: Any = NO_ID) -> Return | ErrorReply:
        """Send one raw line and wait for its reply (the one with ``request_id``,
        or any reply that carries no id)."""
        if not line.endswith(b"\n"):
            line += b"\n"
        try:
            self._sock.sendall(line)
        except OSError as exc:
            raise ConnectionLost(f"cannot send to {self.path}: {_reason(exc)}") from None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self._receive(remaining)
            if isinstance(message, EventMessage):
                self._events.append(message)
            elif isinstance(message, (Return, ErrorReply)):
                if message.id is NO_ID or message.id == request_id or request_id is NO_ID:
                    return message
            # a second greeting or a reply to someone else's id: ignore

    # -- events ---------------------------------------------------------------------------------
    def next_event(self, timeout: float | None = None) -> EventMessage | None:
        """The next event, or None after ``timeout`` seconds (None: wait forever)."""
        if self._events:
            return self._events.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = self._receive(remaining)
            except ResponseTimeout:
                return None
            if isinstance(message, EventMessage):
                return message

    # -- bytes ------------------------------------------------------------------------------------
    def _receive(self, timeout: float | None) -> ServerMessage:
        while True:
            message = self._conn.next_message()
            if message is PEER_CLOSED:
                raise ConnectionLost(f"{self.path}: connection closed by the server")
            if message is not NEED_DATA:
                return message  # type: ignore[return-value]
            if timeout is not None and timeout <= 0:
                raise ResponseTimeout(f"{self.path}: no answer in time")
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ResponseTimeout(f"{self.path}: no answer within {timeout:.1f} s") from None
            except OSError as exc:
                raise ConnectionLost(f"{self.path}: {_reason(exc)}") from None
            self._conn.receive_data(data)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
