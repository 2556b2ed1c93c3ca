"""What the control socket can see and do in a running back-end.

The control server talks only to a ``ControlTarget``: it never reaches into
sessions, queues or IOTLBs itself. The back-end's server implements it
(serialising each call with the vhost-user session); tests use a fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Event = dict[str, Any]  # {"event": NAME, "data": {...}}; the server adds the timestamp


class ControlError(Exception):
    """A command the target refuses; ``error_class`` follows QMP's naming."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class ControlTarget(Protocol):
    def query_address_spaces(self, *, entries: bool = False) -> list[dict[str, Any]]:
        """Per ASID: {"asid", "default": "identity"|"empty", "state": "passthrough"|"empty"|
        "mapped", "entries": n, "mapped_bytes": n, "groups": [...], "touched": bool} and, when
        ``entries``, "mappings": [{"iova", "size", "uaddr", "perm"}, ...] ("gpa" instead of
        "uaddr" for an entry restored from a migrated device state)."""

    def query_groups(self) -> list[dict[str, Any]]:
        """Per virtqueue group: {"group", "asid", "queues": [...]}."""

    def reset_map(self, asid: int) -> dict[str, Any]:
        """Return the ASID to its default mapping; raises ``ControlError`` for a bad ASID.
        Returns {"asid", "entries_dropped", "bytes_unmapped"}."""

    def query_stats(self) -> dict[str, Any]:
        """Counters: translations, misses, iotlb_updates, iotlb_invalidates, device_resets,
        reset_maps, requests, ... (flat name -> int)."""

    def query_status(self) -> dict[str, Any]:
        """{"device": str, "front_end_connected": bool, "features": int, "status": int,
        "iotlb_persist": "negotiated"|"always"|"never", "persist_active": bool, ...}."""

    def flight_recorder(self, fmt: str, last: int | None) -> Any:
        """The flight recorder's events: "chrome" a Chrome trace event JSON object,
        "mermaid" a sequence diagram (text), "summary" {"kept", "recorded", "dropped", ...}."""

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` (from any thread) for each event; returns an unsubscribe function.
        Events: MAP, UNMAP (IOTLB update/invalidate), DEVICE_RESET, RESET_MAP,
        RING_STARTED, RING_STOPPED, FRONT_END_CONNECTED, FRONT_END_DISCONNECTED,
        QUEUE_BROKEN."""
