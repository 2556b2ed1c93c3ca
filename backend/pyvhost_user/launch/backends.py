"""Start and stop vhost-user-blk back-end processes: ours, or qemu-storage-daemon.

One launcher for tests, demos and benchmarks, so that every comparison runs
both back-ends the same way. A back-end is ready when its socket path exists:
ours creates it only once listening; qemu-storage-daemon creates it at bind,
just before listening, and QEMU and our front-end retry a refused connect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .machine import VhostUserBlk
from .qemu_binaries import qemu_storage_daemon

BACKEND_KINDS = ("pyvhost", "qsd")
START_TIMEOUT = 20.0
SOCKET_POLL_INTERVAL = 0.01


class BackendError(RuntimeError):
    pass


@dataclass
class BackendProcess:
    kind: str
    socket_path: Path
    image: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    num_queues: int = 1
    read_only: bool = False

    def device(self, **options: object) -> VhostUserBlk:
        """The matching vhost-user-blk-pci device for a ``Machine``."""
        options.setdefault("num_queues", self.num_queues)
        return VhostUserBlk(self.socket_path, **options)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (the back-end convention), then SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def backend_command(
    kind: str,
    image: Path,
    socket_path: Path,
    *,
    read_only: bool = False,
    num_queues: int = 1,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    if kind == "pyvhost":
        command = [
            sys.executable, "-m", "pyvhost_user.cli.blk",
            "--socket-path", str(socket_path), "--image", str(image),
            "--num-queues", str(num_queues), "--log-level", "debug",
        ]
        if read_only:
            command.append("--read-only")
        return command + list(extra_args)
    if kind == "qsd":
        binary = qemu_storage_daemon()
        return [
            str(binary),
            "--blockdev", f"driver=file,node-name=file0,filename={image}"
            + (",read-only=on" if read_only else ""),
            "--blockdev", "driver=raw,node-name=disk0,file=file0"
            + (",read-only=on" if read_only else ""),
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={socket_path},writable={'off' if read_only else 'on'},"
            f"num-queues={num_queues}",
            *extra_args,
        ]
    raise ValueError(f"unknown back-end kind {kind!r} (one of {', '.join(BACKEND_KINDS)})")


def start_backend(
    kind: str,
    image: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    num_queues: int = 1,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = START_TIMEOUT,
) -> BackendProcess:
    """Start a back-end and return once its socket exists (or raise ``BackendError``)."""
    image, socket_path = Path(image), Path(socket_path)
    log_path = Path(log_path) if log_path else socket_path.with_suffix(".log")
    command = backend_command(
        kind, image, socket_path, read_only=read_only, num_queues=num_queues, extra_args=extra_args
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    backend = BackendProcess(kind, socket_path, image, process, log_path, num_queues, read_only)
    deadline = time.monotonic() + timeout
    # Bounded poll for the socket: neither back-end has another readiness signal.
    while not socket_path.exists():
        if process.poll() is not None:
            raise BackendError(f"{kind} back-end exited with {process.returncode}:\n{backend.log()}")
        if time.monotonic() > deadline:
            backend.stop()
            raise BackendError(f"{kind} back-end did not create {socket_path} in {timeout} s")
        time.sleep(SOCKET_POLL_INTERVAL)
    return backend
