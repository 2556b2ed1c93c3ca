"""The whole contract between a virtio device and the vhost-user server.

A device knows its features, its config space and how to process one
descriptor chain. It knows nothing of the protocol, sockets or rings: the
server hands it checked chains and puts its answer on the used ring.
"""

from __future__ import annotations

import abc

from ..errors import PyVhostUserError
from ..virtqueue.chain import DescriptorChain


class DeviceError(PyVhostUserError):
    """Base of the device layer's errors."""


class Device(abc.ABC):
    """A virtio device served over vhost-user."""

    #: the name `--print-capabilities` reports ("block", "net" ...)
    capability_type: str = ""

    @property
    @abc.abstractmethod
    def num_queues(self) -> int:
        """How many virtqueues the device offers."""

    @property
    @abc.abstractmethod
    def device_features(self) -> int:
        """Device-specific virtio feature bits (transport bits are the server's)."""

    @property
    def num_groups(self) -> int:
        """Virtqueue groups (vDPA's notion): each can be bound to its own ASID."""
        return 1

    def queue_group(self, queue_index: int) -> int:
        """The group a virtqueue belongs to (blk: every queue in group 0)."""
        return 0

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device config space; raises ``DeviceError`` if out of range."""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space; read-only by default."""
        raise DeviceError(f"config space is read-only (write of {len(data)} bytes at {offset})")

    def set_features(self, features: int) -> None:
        """The features the driver acknowledged (device and transport bits)."""

    @abc.abstractmethod
    def process(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; return the number of bytes written to the chain."""

    def reset(self) -> None:
        """Device reset: forget per-driver state (not the backing storage)."""

    def describe(self) -> str:
        return self.capability_type

    def close(self) -> None:
        """Release what the device holds (image fds ...)."""
