"""Fixtures for driving the peer back-end with the reference front-end.

- ``qsd(image, num_queues=1, writable=True)`` -> BackendProcess of
  qemu-storage-daemon exporting ``image``; stopped (by its pid) at teardown.
- ``random_image(size_mib=16)`` -> Path of a raw image full of random bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvhost_user.launch.backends import BackendProcess


@pytest.fixture
def random_image(tmp_path: Path) -> Callable[..., Path]:
    def make(size_mib: int = 16, name: str = "disk.img") -> Path:
        path = tmp_path / name
        path.write_bytes(os.urandom(size_mib << 20))
        return path

    return make


@pytest.fixture
def qsd(backend_factory) -> Callable[..., BackendProcess]:
    def start(image: Path, num_queues: int = 1, writable: bool = True) -> BackendProcess:
        return backend_factory("qsd", image, num_queues=num_queues, read_only=not writable)

    return start
