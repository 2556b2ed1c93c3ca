"""What the device needs of a packet back-end (the switch, a tap): send a
frame, and have received frames handed to it. The implementations are I/O
and live in ``pyvhost_user.packet``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

FrameSink = Callable[[bytes], None]


class PacketPort(Protocol):
    name: str

    def start(self, deliver: FrameSink) -> None:
        """Begin handing each received frame to ``deliver`` (from a thread of the port)."""

    def send(self, frame: bytes) -> None:
        """Send one Ethernet frame (no virtio header); may block for back-pressure."""

    def close(self) -> None: ...
