"""Guest RAM from the reference front-end, mapped by the back-end's memory layer."""

from __future__ import annotations

import pytest

from pyvhost_user.frontend.guest_ram import GuestRam
from pyvhost_user.memory import GuestMemory, map_region


@pytest.fixture
def ram():
    with GuestRam() as ram:
        yield ram


@pytest.fixture
def memory(ram):
    """The back-end's view of ``ram``: every region mapped from its fd."""
    mem = GuestMemory()
    for r in ram.regions:
        mem.add(map_region(r.fd, r.gpa, r.size, r.user_addr, r.mmap_offset))
    return mem
