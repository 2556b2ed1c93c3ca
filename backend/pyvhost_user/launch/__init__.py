"""Launching real QEMU test machines (TCG) with vhost-user devices.

Used by tests and scripts; imports nothing else from pyvhost_user.

    from pyvhost_user.launch import Machine, VhostUserBlk, find_qemu

- qemu_binaries: find_qemu("7.2" | "10.0"), cache_dir(), qemu_storage_daemon()
- guest: guest_image(), kernel_args(), parse_results()
- machine: Machine, VhostUserBlk
- seqwrite: records of the guest's "seqwrite" step, its acks, image checks
- backends: start_backend(), kill_backend(), restart_backend(), freeze_backend(),
  thaw_backend(), frozen_busy()
- netns: VethHosts (two network namespaces joined by a veth pair), netns_exec()
- net: start_switch(), start_net_backend() (vhost-user-net processes)
- dpdk: start_testpmd() (DPDK's testpmd as a net_virtio_user front-end)

Machine and start_backend take ``command_prefix`` (e.g. netns_exec(name)).
"""

from .guest import (
    STEPS,
    BootResults,
    GuestImageError,
    count_done,
    guest_image,
    kernel_args,
    parse_results,
)
from .machine import Machine, MachineError, MachineTimeout, VhostUserBlk
from .qemu_binaries import (
    SUPPORTED_VERSIONS,
    QemuBinary,
    QemuNotFoundError,
    cache_dir,
    find_qemu,
    qemu_storage_daemon,
)

__all__ = [
    "STEPS",
    "SUPPORTED_VERSIONS",
    "BootResults",
    "GuestImageError",
    "Machine",
    "MachineError",
    "MachineTimeout",
    "QemuBinary",
    "QemuNotFoundError",
    "VhostUserBlk",
    "cache_dir",
    "count_done",
    "find_qemu",
    "guest_image",
    "kernel_args",
    "parse_results",
    "qemu_storage_daemon",
]
