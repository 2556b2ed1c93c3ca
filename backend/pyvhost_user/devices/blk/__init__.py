"""virtio-blk: request parsing, the device, its image and counters."""

from .device import BlkDevice

__all__ = ["BlkDevice"]
