"""Fixtures for driving peer backends with the reference front-end.

- ``random_image(size_mib=16)`` -> Path of a raw image full of random bytes.
- ``qsd(image, num_queues=1, writable=True)`` -> QsdExport: qemu-storage-daemon
  exporting ``image`` as vhost-user-blk; returns once its socket exists, stopped
  (by its pid) at teardown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

QSD_START_TIMEOUT = 10.0
QSD_STOP_TIMEOUT = 10.0
SOCKET_POLL_INTERVAL = 0.01


@dataclass
class QsdExport:
    socket_path: Path
    image: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pyvu-fe-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def random_image(tmp_path: Path) -> Callable[..., Path]:
    def make(size_mib: int = 16, name: str = "disk.img") -> Path:
        path = tmp_path / name
        path.write_bytes(os.urandom(size_mib << 20))
        return path

    return make


def _wait_for_socket(process: subprocess.Popen[bytes], path: Path, log_path: Path) -> None:
    deadline = time.monotonic() + QSD_START_TIMEOUT
    # Bounded poll: qemu-storage-daemon has no readiness notification we can use here.
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited: {log_path.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"qemu-storage-daemon did not create {path} in time")
        time.sleep(SOCKET_POLL_INTERVAL)


@pytest.fixture
def qsd(sock_dir: Path) -> Iterator[Callable[..., QsdExport]]:
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        pytest.skip("qemu-storage-daemon is not installed (run scripts/setup.sh)")
    started: list[QsdExport] = []

    def start(image: Path, num_queues: int = 1, writable: bool = True) -> QsdExport:
        index = len(started)
        socket_path = sock_dir / f"qsd{index}.sock"
        log_path = sock_dir / f"qsd{index}.log"
        command = [
            binary,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={socket_path},writable={'on' if writable else 'off'},"
            f"num-queues={num_queues}",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        export = QsdExport(socket_path, image, process, log_path)
        started.append(export)
        _wait_for_socket(process, socket_path, log_path)
        return export

    yield start
    for export in started:
        if export.process.poll() is None:
            export.process.terminate()
            try:
                export.process.wait(QSD_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                export.process.kill()
                export.process.wait()
