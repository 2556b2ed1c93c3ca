"""virtio-net: config, header, RX filter, control queue, the device and its counters."""

from .device import NetDevice

__all__ = ["NetDevice"]
