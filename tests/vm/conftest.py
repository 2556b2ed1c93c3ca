"""Fixtures for tests that boot a real QEMU guest (TCG) on a vhost-user backend.

- ``disk_image(size_mib=64, random=True, name=...)`` -> DiskImage (a path with md5())
- ``backend_factory(kind, image, socket, read_only=False, num_queues=1)`` -> Backend
  kind "qsd": qemu-storage-daemon (C, libvhost-user); kind "pyvhost": ours,
  run as ``vhost-user-blk --socket-path S --image IMG [--read-only] [--num-queues N]``.
  Returns once the backend listens on ``socket``; stopped at teardown.
- ``machine_factory(qemu_version, disks=[...], steps=[...], **Machine kwargs)``
  -> a started Machine, shut down at teardown.
- ``sock_dir``: a short directory for Unix sockets (paths are limited to 107 bytes).
- ``veth_hosts()`` -> VethHosts: two network namespaces joined by a veth pair
  (10.77.0.1/24 and 10.77.0.2/24); run QEMU or a back-end there with
  ``command_prefix=hosts.a.prefix``. Removed at teardown, also after a
  failure; request this fixture before ``machine_factory`` and
  ``backend_factory`` so that it is torn down after their processes.

Missing QEMU or guest image make these fixtures fail (never skip): run
scripts/setup.sh. On a failed test the report gets the tails of the serial
console, QEMU's output and the backend's output.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pyvhost_user.launch import Machine, find_qemu, guest_image
from pyvhost_user.launch.netns import VethHosts

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


@pytest.fixture
def veth_hosts():
    """Factory: VethHosts (see pyvhost_user.launch.netns); needs root."""
    made: list[VethHosts] = []

    def make(**kwargs) -> VethHosts:
        hosts = VethHosts.create(**kwargs)
        made.append(hosts)
        return hosts

    yield make
    problems = []
    for hosts in made:
        # A process still inside would keep its namespace, and the veth in it,
        # alive after the delete: the fixtures that started it must have ended it.
        left = {ns: pids for ns, pids in hosts.pids().items() if pids}
        if left:
            problems.append(f"processes still in the namespaces: {left}")
        try:
            hosts.remove()
        except Exception as e:
            problems.append(str(e))
    assert not problems, "; ".join(problems)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def pytest_terminal_summary(terminalreporter):
    """The "migration" properties tests recorded (record_property): measured
    times and attempts, shown without -s."""
    lines = [f"{report.nodeid}: {value}"
             for key in ("passed", "failed")
             for report in terminalreporter.stats.get(key, [])
             if report.when == "call"
             for name, value in report.user_properties if name == "migration"]
    if lines:
        terminalreporter.section("migration")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        for m in getattr(item, "_pvu_machines", []):
            label = f"{m.name} (QEMU {m.qemu.version}, {m.workdir})"
            rep.sections.append((f"serial console of {label}", _tail(m.serial_text())))
            rep.sections.append((f"QEMU output of {label}", _tail(m.qemu_output(), 30)))
    return rep
