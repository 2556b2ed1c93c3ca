"""Errors of the reference front-end.

A test that drives a backend wants to tell apart "the backend said no"
(``BackendRefused``), "the backend broke the protocol" (``ProtocolViolation``),
"the backend went silent" (``FrontendTimeout``) and "the backend hung up"
(``BackendClosed``); each is its own class.
"""

from __future__ import annotations

from ..errors import PyVhostUserError
from ..wire import request_name


class FrontendError(PyVhostUserError):
    """Base of the front-end's errors."""


class FrontendTimeout(FrontendError):
    """The backend did not answer, or complete a request, in time."""


class BackendClosed(FrontendError):
    """The backend closed the connection."""


class ProtocolViolation(FrontendError):
    """The backend sent something the protocol does not allow (bad reply, bad used entry...)."""


class NotNegotiated(FrontendError):
    """A sequence needs a feature the backend did not offer."""


class BackendRefused(FrontendError):
    """A REPLY_ACK answer was non-zero: the backend refused ``request``."""

    def __init__(self, request: int, code: int) -> None:
        super().__init__(f"backend refused {request_name(request)}: ack {code:#x}")
        self.request = request
        self.code = code


class RingError(FrontendError):
    """Misuse of the driver side of a ring (full ring, unknown head...)."""
