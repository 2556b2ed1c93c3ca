"""Fixtures for tests that boot a real QEMU guest (TCG) on a vhost-user backend.

- ``disk_image(size_mib=64, random=True, name=...)`` -> DiskImage (a path with md5())
- ``backend_factory(kind, image, socket, read_only=False, num_queues=1)`` -> Backend
  kind "qsd": qemu-storage-daemon (C, libvhost-user); kind "pyvhost": ours,
  run as ``vhost-user-blk --socket-path S --image IMG [--read-only] [--num-queues N]``.
  Returns once the backend listens on ``socket``; stopped at teardown.
- ``machine_factory(qemu_version, disks=[...], steps=[...], **Machine kwargs)``
  -> a started Machine, shut down at teardown.
- ``sock_dir``: a short directory for Unix sockets (paths are limited to 107 bytes).

Missing QEMU or guest image make these fixtures fail (never skip): run
scripts/setup.sh. On a failed test the report gets the tails of the serial
console, QEMU's output and the backend's output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pyvhost_user.launch import Machine, VhostUserBlk, find_qemu, guest_image
from pyvhost_user.launch.qemu_binaries import qemu_storage_daemon

QEMU_VERSIONS = ("7.2", "10.0")
BACKEND_START_TIMEOUT = 20.0


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots a real QEMU guest (TCG)")


# ---- disk images --------------------------------------------------------------

class DiskImage(os.PathLike):
    """A raw disk image file on the host."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"DiskImage({str(self.path)!r})"

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def md5(self, offset: int = 0, length: int | None = None) -> str:
        h = hashlib.md5()
        with open(self.path, "rb") as f:
            f.seek(offset)
            left = length
            while left is None or left > 0:
                chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
                if not chunk:
                    break
                h.update(chunk)
                if left is not None:
                    left -= len(chunk)
        return h.hexdigest()


@pytest.fixture
def disk_image(tmp_path):
    """Factory: a raw image of ``size_mib`` MiB, random (default) or zero."""
    counter = [0]

    def make(size_mib: int = 64, *, random: bool = True, name: str | None = None) -> DiskImage:
        counter[0] += 1
        path = tmp_path / (name or f"disk{counter[0]}.img")
        with open(path, "wb") as f:
            if random:
                f.writelines(os.urandom(1 << 20) for _ in range(size_mib))
            else:
                f.truncate(size_mib << 20)
        return DiskImage(path)

    return make


# ---- sockets --------------------------------------------------------------------

@pytest.fixture
def sock_dir():
    """A short-named temporary directory for Unix sockets."""
    d = Path(tempfile.mkdtemp(prefix="pvu-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def unix_socket_listening(path: Path) -> bool:
    """Whether a backend listens on the Unix socket ``path``, without connecting
    (a probe connection would be a client the backend has to serve).

    The path must exist and be a socket. /proc/net/unix names sockets by the
    path they were bound to: if that is ``path``, it must be listening; a
    backend that binds a temporary name and renames it into place (after
    listen) is not listed under ``path``, and its socket counts as listening.
    """
    target = os.fspath(path)
    try:
        if not stat.S_ISSOCK(os.stat(target).st_mode):
            return False
    except FileNotFoundError:
        return False
    try:
        with open("/proc/net/unix") as f:
            next(f)
            entries = [line.split() for line in f]
    except OSError:
        return True
    mine = [e for e in entries if len(e) >= 8 and e[7] == target]
    # Flags: __SO_ACCEPTCON (0x10000) means listening.
    return not mine or any(int(e[3], 16) & 0x10000 for e in mine)


# ---- backends -------------------------------------------------------------------

@dataclass
class Backend:
    """A running vhost-user-blk backend process."""

    kind: str
    socket: Path
    image: Path
    read_only: bool
    num_queues: int
    log: Path
    argv: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def device(self, **kwargs) -> VhostUserBlk:
        """The matching vhost-user-blk-pci device for a Machine."""
        kwargs.setdefault("num_queues", self.num_queues)
        return VhostUserBlk(self.socket, **kwargs)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (by pid), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


def qsd_argv(image, socket, read_only: bool, num_queues: int, version: str = "7.2") -> list[str]:
    return [
        str(qemu_storage_daemon(version)),
        "--blockdev", f"driver=file,node-name=file0,filename={os.fspath(image)}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export", ("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                     f"addr.path={os.fspath(socket)},writable={'off' if read_only else 'on'},"
                     f"num-queues={num_queues}"),
    ]


def pyvhost_argv(image, socket, read_only: bool, num_queues: int) -> list[str]:
    exe = Path(sys.executable).parent / "vhost-user-blk"
    if not exe.exists():
        found = shutil.which("vhost-user-blk")
        if found is None:
            raise RuntimeError("vhost-user-blk (the pyvhost-user backend) is not installed: "
                               "run scripts/setup.sh")
        exe = Path(found)
    argv = [str(exe), "--socket-path", os.fspath(socket), "--image", os.fspath(image),
            "--num-queues", str(num_queues)]
    if read_only:
        argv.append("--read-only")
    return argv


BACKEND_KINDS = {
    "qsd": qsd_argv,
    "pyvhost": pyvhost_argv,
}


@pytest.fixture
def backend_factory(request, tmp_path):
    """Factory: start a backend of ``kind`` serving ``image`` on ``socket``."""
    started: list[Backend] = []
    request.node._pvu_backends = started

    def start(kind: str, image, socket, read_only: bool = False, num_queues: int = 1,
              *, timeout: float = BACKEND_START_TIMEOUT, **kind_args) -> Backend:
        if kind not in BACKEND_KINDS:
            raise ValueError(f"unknown backend kind {kind!r}; known: {sorted(BACKEND_KINDS)}")
        socket = Path(socket)
        socket.unlink(missing_ok=True)
        argv = BACKEND_KINDS[kind](image, socket, read_only, num_queues, **kind_args)
        log = tmp_path / f"backend-{kind}-{len(started)}.log"
        b = Backend(kind, socket, Path(image), read_only, num_queues, log, argv)
        with open(log, "wb") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            b.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT)
        started.append(b)
        deadline = time.monotonic() + timeout
        while not unix_socket_listening(socket):
            if not b.alive():
                pytest.fail(f"backend {kind} exited ({b.proc.returncode}) before listening "
                            f"on {socket}:\n{b.output()[-3000:]}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"backend {kind} not listening on {socket} after {timeout} s:\n"
                            f"{b.output()[-3000:]}", pytrace=False)
            time.sleep(0.02)
        return b

    yield start
    for b in started:
        b.stop()


# ---- machines ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def guest_kernel_initrd():
    """(kernel, initrd), built once per session; fails (not skips) when impossible."""
    return guest_image()


@pytest.fixture
def machine_factory(request, tmp_path, guest_kernel_initrd):
    """Factory: a started Machine (see pyvhost_user.launch.Machine)."""
    machines: list[Machine] = []
    request.node._pvu_machines = machines

    def make(qemu_version: str, disks=(), *, start: bool = True, **kwargs) -> Machine:
        qemu = find_qemu(qemu_version)      # QemuNotFoundError names scripts/setup.sh
        kwargs.setdefault("kernel", guest_kernel_initrd[0])
        kwargs.setdefault("initrd", guest_kernel_initrd[1])
        name = kwargs.pop("name", f"vm{len(machines)}")
        m = Machine(qemu, tmp_path / name, disks=disks, name=name, **kwargs)
        machines.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in machines:
        m.shutdown()


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        for m in getattr(item, "_pvu_machines", []):
            label = f"{m.name} (QEMU {m.qemu.version}, {m.workdir})"
            rep.sections.append((f"serial console of {label}", _tail(m.serial_text())))
            rep.sections.append((f"QEMU output of {label}", _tail(m.qemu_output(), 30)))
        for b in getattr(item, "_pvu_backends", []):
            rep.sections.append((f"backend {b.kind} output ({b.log})", _tail(b.output(), 40)))
    return rep
