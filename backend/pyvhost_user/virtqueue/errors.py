"""Errors of the virtqueue layer.

``BadChain`` and ``QueueCorrupted`` both mean the driver broke the ring
rules. Since a chain that cannot be walked has no trustworthy status byte to
answer through, both end in the same outcome (the queue is marked broken and
its error eventfd signalled); they stay apart so logs and counters say which.
"""

from __future__ import annotations

from ..errors import PyVhostUserError


class QueueError(PyVhostUserError):
    """Base of the virtqueue layer's errors."""


class InvalidQueueConfig(QueueError):
    """The ring cannot be activated: bad size, misaligned or unmapped ring."""


class QueueCorrupted(QueueError):
    """The ring itself is inconsistent (avail index too far ahead, head out of range)."""


class BadChain(QueueError):
    """One descriptor chain breaks the rules (loop, bad index, unmapped buffer ...)."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"descriptor chain at head {head}: {reason}")
        self.head = head
        self.reason = reason
