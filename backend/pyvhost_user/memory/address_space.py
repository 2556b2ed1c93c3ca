"""Address spaces the virtqueue layer reads guest memory through.

A virtqueue does not know how its addresses are translated: without
ACCESS_PLATFORM, ring addresses are front-end virtual addresses and buffer
addresses are guest physical; with it, both are IOVAs that an IOTLB turns into
front-end virtual addresses. Each is an ``AddressSpace``; ``write`` says
whether the device will write, so an IOTLB can enforce permissions.
"""

from __future__ import annotations

from typing import Protocol

from .guest_memory import AddressKind, GuestMemory


class AddressSpace(Protocol):
    """Translate a range to zero-copy views, or raise ``GuestMemoryError``."""

    name: str

    @property
    def generation(self) -> int:
        """Changes whenever a translation may have changed (views must be re-resolved)."""

    def views(self, addr: int, length: int, *, write: bool) -> list[memoryview]: ...

    def view(self, addr: int, length: int, *, write: bool) -> memoryview: ...


class DirectSpace:
    """Guest memory addressed directly by guest physical or front-end virtual address."""

    def __init__(self, memory: GuestMemory, kind: AddressKind) -> None:
        self.memory = memory
        self.kind: AddressKind = kind
        self.name = kind

    @property
    def generation(self) -> int:
        return self.memory.generation

    def views(self, addr: int, length: int, *, write: bool) -> list[memoryview]:
        return self.memory.views(self.kind, addr, length)

    def view(self, addr: int, length: int, *, write: bool) -> memoryview:
        return self.memory.view(self.kind, addr, length)
