"""Errors of the memory layer."""

from __future__ import annotations

from ..errors import PyVhostUserError


class GuestMemoryError(PyVhostUserError):
    """Base of the memory layer's errors."""


class BadMemoryRegion(GuestMemoryError):
    """A region the front-end sent cannot be mapped, added or removed."""


class UnmappedAddress(GuestMemoryError):
    """An address range that no region (or IOTLB entry) covers."""

    def __init__(self, kind: str, addr: int, length: int, detail: str) -> None:
        super().__init__(f"{kind} range {addr:#x}+{length:#x} is not mapped: {detail}")
        self.kind = kind
        self.addr = addr
        self.length = length
