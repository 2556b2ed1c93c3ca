"""Errors of the wire layer.

Two families, because they call for different outcomes:

* ``FramingError``: the byte stream itself can no longer be trusted (bad
  version, absurd size, too many fds). The only safe reaction is to drop the
  connection.
* ``MalformedMessage``: the header was fine and the whole message was consumed,
  but its payload or fds are wrong for its request. The stream is still in
  sync, so the caller may refuse just this message (nack when asked) and go on.
  It carries the header so the refusal can be addressed.
"""

from __future__ import annotations

from ..errors import PyVhostUserError


class WireError(PyVhostUserError):
    """Base of the wire layer's errors."""


class FramingError(WireError):
    """The stream is out of sync or hostile; the connection must be dropped."""


class PeerClosed(WireError):
    """The peer closed the connection (possibly mid-message)."""


class MalformedMessage(WireError):
    """A complete message whose content breaks the protocol's syntax."""

    def __init__(self, reason: str, *, request: int, flags: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request = request
        self.flags = flags


class UnknownRequest(MalformedMessage):
    """A request code this implementation does not know."""


class BadPayloadSize(MalformedMessage):
    """The payload size does not fit the request's layout."""


class InvalidField(MalformedMessage):
    """A field has a value the protocol does not allow (reserved bits, counts...)."""


class UnexpectedFds(MalformedMessage):
    """More file descriptors came with the message than the request allows."""


class MissingFds(MalformedMessage):
    """Fewer file descriptors came with the message than the request needs."""


class BadFlags(MalformedMessage):
    """Header flags wrong for the direction (a reply where a request belongs...)."""
