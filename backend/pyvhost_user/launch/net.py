"""Start the net switch and vhost-user-net back-ends as processes; QEMU's net device.

Ready means: the switch's socket exists (it creates it listening); a
back-end's vhost-user socket exists (it attaches to the switch or tap
first, so frames can flow once the socket is there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .process import ListeningProcess, wait_listening

START_TIMEOUT = 20.0


class NetProcessError(RuntimeError):
    pass


@dataclass
class NetProcess(ListeningProcess):
    """The switch or one back-end, by pid, with its log."""

    what: str
    socket_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path


def _start(what: str, command: list[str], socket_path: Path, log_path: Path,
           timeout: float) -> NetProcess:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    proc = NetProcess(what, socket_path, process, log_path)
    wait_listening(proc, socket_path, timeout, what, NetProcessError)
    return proc


def start_switch(socket_path: str | os.PathLike[str], *, log_path: str | os.PathLike[str] | None = None,
                 timeout: float = START_TIMEOUT) -> NetProcess:
    socket_path = Path(socket_path)
    command = [sys.executable, "-m", "pyvhost_user.cli.net_switch",
               "--socket-path", str(socket_path), "--log-level", "debug"]
    return _start("switch", command, socket_path,
                  Path(log_path) if log_path else socket_path.with_suffix(".log"), timeout)


def start_net_backend(
    socket_path: str | os.PathLike[str],
    *,
    switch: str | os.PathLike[str] | None = None,
    tap: str | None = None,
    mac: str | None = None,
    queue_pairs: int = 1,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike[str] | None = None,
    command_prefix: Sequence[str] = (),
    log_level: str = "debug",
    timeout: float = START_TIMEOUT,
) -> NetProcess:
    """``command_prefix``: e.g. netns.netns_exec(name), which execs the back-end."""
    socket_path = Path(socket_path)
    command = [*command_prefix, sys.executable, "-m", "pyvhost_user.cli.net",
               "--socket-path", str(socket_path), "--queue-pairs", str(queue_pairs),
               "--log-level", log_level]
    if switch is not None:
        command += ["--switch", os.fspath(switch)]
    if tap is not None:
        command += ["--tap", tap]
    if mac is not None:
        command += ["--mac", mac]
    command += list(extra_args)
    return _start("vhost-user-net", command, socket_path,
                  Path(log_path) if log_path else socket_path.with_suffix(".log"), timeout)


# What puts a virtio device behind the machine's vIOMMU (launch.machine's
# VIOMMU_DISK_OPTIONS, kept here so that launch.net needs no QEMU machinery).
VIOMMU_NIC_OPTIONS = {"iommu_platform": "on", "ats": "on", "disable-legacy": "on"}


@dataclass
class VhostUserNet:
    """A virtio-net-pci device whose vhost-user back-end listens on ``socket``
    (for ``Machine(extra_args=...)``: ``nic.args(index)``).

    ``packed``: ``packed=on`` (QEMU offers VIRTIO_F_RING_PACKED to the guest
    and passes it on to the back-end). ``iommu``: behind the machine's vIOMMU
    (``Machine(viommu=True)``): ``iommu_platform=on,ats=on,disable-legacy=on``
    and a ``pcie-root-port`` of its own, without which the device is not PCI
    Express, the guest never enables ATS and QEMU 7.2 passes on no IOTLB
    invalidation (docs/vm-testing.md, "A guest vIOMMU").
    """

    socket: str | os.PathLike[str]
    mac: str
    queue_pairs: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    packed: bool = False
    iommu: bool = False

    def args(self, index: int) -> list[str]:
        chardev, netdev = f"char-net{index}", f"net{index}"
        device = f"virtio-net-pci,netdev={netdev},mac={self.mac}"
        if self.queue_pairs > 1:
            device += ",mq=on"
            if "vectors" not in self.options:
                device += f",vectors={2 * self.queue_pairs + 2}"
        options = dict(self.options)
        if self.packed:
            options.setdefault("packed", "on")
        root_port: list[str] = []
        if self.iommu:
            for k, v in VIOMMU_NIC_OPTIONS.items():
                options.setdefault(k, v)
            if "bus" not in options:
                port = f"rp-net{index}"
                # chassis numbers of their own: disks' ports count from 1
                root_port = ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={101 + index}"]
                options["bus"] = port
        device += "".join(f",{k}={v}" for k, v in options.items())
        return ["-chardev", f"socket,id={chardev},path={os.fspath(self.socket)}",
                "-netdev", f"vhost-user,id={netdev},chardev={chardev},queues={self.queue_pairs}",
                *root_port, "-device", device]
