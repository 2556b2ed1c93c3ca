"""Virtqueue layer: split and packed rings and descriptor chains over guest memory."""

from .chain import DescriptorChain, walk_chain
from .errors import BadChain, InvalidQueueConfig, QueueCorrupted, QueueError
from .packed import PackedQueue
from .split import QueueConfig, SplitQueue, signal_eventfd

__all__ = [
    "BadChain",
    "DescriptorChain",
    "InvalidQueueConfig",
    "PackedQueue",
    "QueueConfig",
    "QueueCorrupted",
    "QueueError",
    "SplitQueue",
    "signal_eventfd",
    "walk_chain",
]
