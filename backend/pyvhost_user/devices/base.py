"""The whole contract between a virtio device and the vhost-user server.

A device knows its features, its config space and how to process one
descriptor chain. It knows nothing of the protocol, sockets or rings: the
server hands it checked chains and puts its answer on the used ring.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from ..errors import PyVhostUserError
from ..virtqueue.chain import DescriptorChain


class DeviceError(PyVhostUserError):
    """Base of the device layer's errors."""


_ABSENT = object()


def _short(value: Any, limit: int = 60) -> str:
    """A value for a log line: a state from a front-end can hold anything, of any size."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

    def blocks(self, chain: DescriptorChain) -> bool:
        """Whether serving ``chain`` may block for long whatever its size (a
        flush): such requests go to the queue's I/O threads when it has some.
        Called for every small request then, so it must be cheap; a wrong
        guess only changes which thread serves the request."""
        return False

    # -- worker processes (server/queue_process.py) -------------------------------
    #: Whether a ring may be served from a forked worker process: only when all
    #: the device needs for a request is in what the child inherits (blk: the
    #: image fd). Net is not: frames arrive in the back-end process.
    allows_worker_processes: bool = False

    # -- counters of a worker process (server/queue_process.py) ------------------
    def start_private_counters(self) -> None:
        """In a worker process: count from zero, with locks of its own."""

    def private_counters(self) -> dict[str, int]:
        """In a worker process: what it counted, for the back-end to add."""
        return {}

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """In the back-end: add what a worker process counted."""

    def reset(self) -> None:
        """Device reset: forget per-driver state (not the backing storage)."""

    # -- queues the device fills on its own (net RX) ---------------------------------
    # A kick-driven queue (blk, net TX) is served when the driver adds requests. A
    # queue the device fills (net RX) is served when the device has something for it
    # AND the driver has added buffers: a kick then only means "buffers added".
    def work_fd(self, queue_index: int) -> int | None:
        """An eventfd the device signals when it has new work for this queue that
        no kick announces (frames arrived); None for a kick-driven queue."""
        return None

    def has_work(self, queue_index: int) -> bool:
        """Whether a buffer popped now would be used: always, for a kick-driven queue."""
        return True

    def queue_ready(self, queue_index: int, ready: bool) -> None:
        """The queue was started and enabled (True), or disabled or stopped (False)."""

    # -- requests vhost-user defines for net devices ------------------------------------
    #: offer the RARP protocol feature (VHOST_USER_SEND_RARP)
    sends_rarp: bool = False
    #: offer the NET_MTU protocol feature (VHOST_USER_NET_SET_MTU)
    takes_mtu: bool = False

    def send_rarp(self, mac: bytes) -> None:
        """Broadcast a RARP from ``mac`` (after a migration, for a guest that
        cannot announce itself)."""
        raise DeviceError(f"{self.capability_type or 'this'} device sends no RARP")

    def set_mtu(self, mtu: int) -> None:
        """The MTU the front-end's user configured."""
        raise DeviceError(f"{self.capability_type or 'this'} device has no MTU")

    # -- migration (VHOST_USER_SET_DEVICE_STATE_FD) ----------------------------------
    def export_state(self) -> dict[str, Any]:
        """What a migration destination must get from this device, as JSON values:
        the volatile state the driver changed, and the configuration the driver
        relies on, which the destination must have the same."""
        return {"type": self.capability_type}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``DeviceError`` unless this device can take ``state`` (a source's
        ``export_state``). A device with no volatile state takes only its own."""
        mine = self.export_state()
        differences = [
            f"{str(key)[:60]}: {_short(state.get(key, '(absent)'))} on the source, "
            f"{_short(mine.get(key, '(absent)'))} here"
            for key in sorted(set(mine) | set(state))
            if state.get(key, _ABSENT) != mine.get(key, _ABSENT)
        ]
        if differences:
            more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
            raise DeviceError("device state does not match this device: "
                              + "; ".join(differences[:5]) + more)

    def import_state(self, state: Mapping[str, Any]) -> None:
        """Take a state ``check_state`` accepted (nothing to do without volatile state)."""

    def describe(self) -> str:
        return self.capability_type

    def close(self) -> None:
        """Release what the device holds (image fds ...)."""
