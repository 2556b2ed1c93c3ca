"""The running back-end as the control socket sees it (a ``ControlTarget``).

Every call takes the server's lock, the one held while a vhost-user message
is handled, so an operator's command never interleaves with a message.
IOTLBs belong to the front-end's session: with no front-end connected there
are no address spaces to show or reset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..control.target import ControlError, Event
from ..memory.iotlb import IotlbError
from ..recorder import chrome_trace, mermaid_sequence
from .loop import BackendServer
from .session import Session


class BackendControl:
    """``server`` may be set after the control socket opened (it opens first)."""

    def __init__(self, server: BackendServer | None) -> None:
        self._server = server
        self._early_listeners: list[Callable[[Event], None]] = []

    @property
    def server(self) -> BackendServer:
        if self._server is None:
            raise ControlError("the back-end is still starting")
        return self._server

    @server.setter
    def server(self, server: BackendServer) -> None:
        self._server = server
        for listener in self._early_listeners:
            server.subscribe(listener)
        self._early_listeners.clear()

    def _session(self) -> Session:
        session = self.server.session
        if session is None:
            raise ControlError("no front-end is connected: there are no address spaces")
        return session

    def query_address_spaces(self, *, entries: bool = False) -> list[dict[str, Any]]:
        with self.server.lock:
            session = self.server.session
            if session is None:
                return []
            out = []
            for info, iotlb in zip(session.asids.describe(), session.asids.iotlbs):
                info["touched"] = iotlb.touched
                if entries:
                    # A restored entry points at a guest physical address, not a user one.
                    info["mappings"] = [
                        {"iova": e.iova, "size": e.size,
                         ("uaddr" if e.kind == "uva" else "gpa"): e.target, "perm": e.perm}
                        for e in iotlb.entries()
                    ]
                out.append(info)
            return out

    def query_groups(self) -> list[dict[str, Any]]:
        device = self.server.device
        with self.server.lock:
            session = self.server.session
            bindings = session.asids.group_asid if session else [0] * device.num_groups
            return [
                {
                    "group": group,
                    "asid": asid,
                    "queues": [q for q in range(device.num_queues) if device.queue_group(q) == group],
                }
                for group, asid in enumerate(bindings)
            ]

    def reset_map(self, asid: int) -> dict[str, Any]:
        with self.server.lock:
            session = self._session()
            try:
                return session.reset_map(asid, cause="control socket")
            except IotlbError as exc:
                raise ControlError(str(exc), "InvalidParameter") from None

    def query_stats(self) -> dict[str, Any]:
        with self.server.lock:
            stats: dict[str, Any] = {"sessions_served": self.server.sessions_served}
            session = self.server.session
            if session is not None:
                stats.update(session.counters)
                stats.update(session.map_cost.describe())
                stats["reset_map_seconds"] = round(session.reset_map_seconds, 6)
                for name in ("translations", "misses", "access_denials"):
                    stats[f"iotlb_{name}"] = sum(getattr(t, name) for t in session.asids.iotlbs)
            metrics = getattr(self.server.device, "metrics", None)
            if metrics is not None:
                stats.update(metrics.snapshot())
            return stats

    def query_status(self) -> dict[str, Any]:
        with self.server.lock:
            session = self.server.session
            status: dict[str, Any] = {
                "device": self.server.device.describe(),
                "front_end_connected": session is not None,
                "iotlb_persist": self.server.options.iotlb_persist.value,
                "num_asids": self.server.options.num_asids,
            }
            if session is not None:
                status.update(
                    features=session.acked_features,
                    protocol_features=session.acked_protocol_features,
                    status=session.status,
                    access_platform=session.access_platform,
                    extension=session.extension_acked,
                    persist_active=session.persist_active,
                    rings=session.describe_state()["rings"],
                )
            return status

    def flight_recorder(self, fmt: str, last: int | None) -> Any:
        recorder = self.server.recorder  # thread-safe on its own: no lock needed
        if fmt == "summary":
            return recorder.describe()
        events = recorder.events(last)
        title = f"{self.server.device.describe()}: last {len(events)} events"
        if fmt == "mermaid":
            return mermaid_sequence(events, title=title)
        return chrome_trace(events, process=f"back-end {self.server.device.describe()}",
                            other=recorder.describe())

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        if self._server is None:  # the control socket opens before the back-end listens
            self._early_listeners.append(listener)

            def unsubscribe_later() -> None:
                if listener in self._early_listeners:
                    self._early_listeners.remove(listener)
                elif self._server is not None:
                    self._server.unsubscribe(listener)

            return unsubscribe_later
        return self._server.subscribe(listener)
