"""Server layer: the session (dispatcher, life cycle) and the socket loop."""

from .loop import BackendServer
from .session import Disconnect, Refused, Session

__all__ = ["BackendServer", "Disconnect", "Refused", "Session"]
