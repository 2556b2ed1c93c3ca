"""Packet back-ends a net device sends frames on: the built-in switch, a tap.

Each is a ``PacketPort`` (devices/net/port.py): ``start(deliver)``,
``send(frame)``, ``close()``. Nothing here knows virtio.
"""

from .switch import SwitchPort, SwitchServer
from .tap import TapPort

__all__ = ["SwitchPort", "SwitchServer", "TapPort"]
