"""Real guests on QEMU 7.2 and 10.0 (TCG) reading and writing a vhost-user-blk disk.

Each scenario runs on our back-end and on qemu-storage-daemon, the C peer
QEMU ships: the peer proves the test itself (guest, QEMU, checks), ours is
what is under test. PVU_VM_BACKENDS=pyvhost narrows a local run.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from pyvhost_user.launch import SUPPORTED_VERSIONS as QEMU_VERSIONS
from pyvhost_user.wire import VendorProtocolFeature

BACKENDS = os.environ.get("PVU_VM_BACKENDS", "pyvhost,qsd").split(",")
MiB = 1 << 20

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]


def check_boot(boot, machine):
    assert boot.done, machine.describe("guest did not finish")
    assert not boot.errors, machine.describe(f"guest errors: {boot.errors}")


@pytest.mark.parametrize("backend_kind", BACKENDS)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_guest_reads_whole_disk_and_writes_at_offset(
        qemu_version, backend_kind, disk_image, backend_factory, machine_factory):
    image = disk_image(64)
    host_md5 = image.md5()
    write_mib = 8
    before_outside = (image.md5(0, write_mib * MiB), image.md5((write_mib + 4) * MiB))
    backend = backend_factory(backend_kind, image)

    m = machine_factory(qemu_version, [backend.device()],
                        steps=["queues", "md5", "write"], write_mib=write_mib)
    [boot] = m.wait_for_done(timeout=90)
    done_after = m.uptime()
    check_boot(boot, m)
    assert m.wait_exit(30) == 0

    assert boot["queues"] == "1"
    assert int(boot["size"]) == 64 * MiB
    assert boot["md5"] == host_md5
    assert boot["write"] == "ok"
    assert boot["readback_md5"] == boot["write_md5"]
    # The guest's data is on the host image, at the right offset, and only there.
    assert image.md5(write_mib * MiB, 4 * MiB) == boot["write_md5"]
    assert (image.md5(0, write_mib * MiB), image.md5((write_mib + 4) * MiB)) == before_outside
    print(f"QEMU {qemu_version}: start -> PVU-DONE {done_after:.1f} s")
    if backend_kind == "pyvhost":
        assert_vendor_bits_offered_and_ignored(backend.log())


def assert_vendor_bits_offered_and_ignored(trace: str) -> None:
    """Our extension's protocol bits (48, 49) are offered; stock QEMU does not ack them."""
    offered = re.search(r"-> GET_PROTOCOL_FEATURES reply value=(0x[0-9a-f]+)", trace)
    acked = re.search(r"<- SET_PROTOCOL_FEATURES value=(0x[0-9a-f]+)", trace)
    assert offered and acked, "protocol features not in the trace"
    vendor = VendorProtocolFeature.ADDRESS_SPACES | VendorProtocolFeature.IOTLB_PERSIST
    assert int(offered.group(1), 16) & vendor == vendor
    assert int(acked.group(1), 16) & vendor == 0


@pytest.mark.parametrize("backend_kind", BACKENDS)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_read_only_disk_refuses_writes(
        qemu_version, backend_kind, disk_image, backend_factory, machine_factory):
    image = disk_image(16)
    host_md5 = image.md5()
    backend = backend_factory(backend_kind, image, read_only=True)

    m = machine_factory(qemu_version, [backend.device()], steps=["md5", "writefail"],
                        write_mib=4)
    [boot] = m.wait_for_done(timeout=90)
    assert boot.done
    assert boot["md5"] == host_md5
    assert boot["write"] == "refused"
    assert m.wait_exit(30) == 0
    assert image.md5() == host_md5


@pytest.mark.parametrize("backend_kind", BACKENDS)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_multiqueue_disk(
        qemu_version, backend_kind, disk_image, backend_factory, machine_factory):
    image = disk_image(16)
    backend = backend_factory(backend_kind, image, num_queues=4)

    # Linux uses min(num-queues, CPUs) queues: 4 vCPUs for 4 queues.
    m = machine_factory(qemu_version, [backend.device()], steps=["queues", "md5"], smp=4)
    [boot] = m.wait_for_done(timeout=90)
    check_boot(boot, m)
    assert boot["queues"] == "4"
    assert boot["md5"] == image.md5()


@pytest.mark.parametrize("backend_kind", BACKENDS)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_guest_reboots_reset_the_device(
        qemu_version, backend_kind, disk_image, backend_factory, machine_factory):
    """Without -no-reboot, each guest reboot resets the vhost-user device."""
    image = disk_image(16)
    backend = backend_factory(backend_kind, image)

    m = machine_factory(qemu_version, [backend.device()], steps=["md5", "write"],
                        write_mib=2, reboot=True)
    boots = m.wait_for_done(timeout=100, boots=3)
    reset = m.wait_for_event("RESET", timeout=10, count=2)
    assert reset["data"]["guest"] is True
    t = time.monotonic()
    m.shutdown()
    assert time.monotonic() - t < 15
    assert len(boots) >= 3
    for boot in boots[:3]:
        check_boot(boot, m)
        assert boot["write"] == "ok"
        assert boot["readback_md5"] == boot["write_md5"]
    # Each boot sees what the previous boot wrote.
    assert boots[1]["md5"] != boots[0]["md5"]
    assert backend.alive()
    if backend_kind == "pyvhost":
        # The device was reset and restarted on every boot, and QEMU never sent
        # the memory table again: it must survive the reset.
        trace = backend.log()
        first_stop = trace.index("<- GET_VRING_BASE")
        assert trace.count("<- ADD_MEM_REG") + trace.count("<- SET_MEM_TABLE") > 0
        assert "<- ADD_MEM_REG" not in trace[first_stop:]
        assert "<- SET_MEM_TABLE" not in trace[first_stop:]
        assert trace.count("ring 0 started") >= 2 * 3  # firmware and kernel, each boot
