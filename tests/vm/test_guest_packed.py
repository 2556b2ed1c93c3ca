"""Real guests on QEMU 7.2 and 10.0 (TCG) driving our back-end with packed rings.

``vhost-user-blk-pci,packed=on`` makes QEMU offer VIRTIO_F_RING_PACKED to the
guest; Linux's virtio_ring then lays out packed rings, and QEMU passes the bit
on to the back-end with SET_FEATURES. A kernel or QEMU that silently fell back
to split rings would pass the data checks, so every test also reads the
back-end's trace: bit 34 acked, every ring started packed, and the packed
SET_VRING_BASE encoding (avail index | wrap << 15, used index | wrap << 15 in
the high half) with both wrap counters set on a fresh ring.

SeaBIOS has no packed-ring support: QEMU offers it RING_PACKED, it does not
accept it, and its rings are split; only the kernel's are packed. So the trace
has a split start (firmware) before the packed ones on each boot.
"""

from __future__ import annotations

import re

import pytest
from pyvhost_user.launch import SUPPORTED_VERSIONS as QEMU_VERSIONS
from pyvhost_user.wire import VirtioFeature

MiB = 1 << 20
RING_PACKED = int(VirtioFeature.RING_PACKED)
FRESH_PACKED_BASE = 0x8000_8000  # positions 0, both wrap counters 1

pytestmark = [pytest.mark.vm]


def check_boot(boot, machine):
    assert boot.done, machine.describe("guest did not finish")
    assert not boot.errors, machine.describe(f"guest errors: {boot.errors}")


def packed_device(backend, **options):
    return backend.device(options={"packed": True}, **options)


def assert_packed_negotiated(trace: str, *, queues: int = 1, starts: int = 1) -> None:
    """The kernel's driver acked RING_PACKED and every ring it started is packed."""
    acked = [int(v, 16) for v in re.findall(r"<- SET_FEATURES value=(0x[0-9a-f]+)", trace)]
    assert any(v & RING_PACKED for v in acked), f"RING_PACKED never acked: {acked}"
    started = re.findall(r"ring (\d+) started: packed, size (\d+) base (0x[0-9a-f]+)", trace)
    for q in range(queues):
        runs = [s for s in started if int(s[0]) == q]
        assert len(runs) >= starts, f"ring {q} started packed {len(runs)} times: {started}"
    # A fresh packed ring: QEMU sends avail 0 wrap 1 and used 0 wrap 1.
    bases = re.findall(r"<- SET_VRING_BASE index=\d+ num=(0x[0-9a-f]+|\d+)", trace)
    assert any(int(b, 0) == FRESH_PACKED_BASE for b in bases), bases
    assert "marked broken" not in trace


@pytest.mark.timeout(150)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_packed_guest_reads_whole_disk_and_writes_at_offset(
        qemu_version, disk_image, backend_factory, machine_factory):
    image = disk_image(64)
    host_md5 = image.md5()
    write_mib = 8
    before_outside = (image.md5(0, write_mib * MiB), image.md5((write_mib + 4) * MiB))
    backend = backend_factory("pyvhost", image)

    m = machine_factory(qemu_version, [packed_device(backend)],
                        steps=["queues", "md5", "write"], write_mib=write_mib)
    [boot] = m.wait_for_done(timeout=120)
    check_boot(boot, m)
    assert m.wait_exit(30) == 0

    assert int(boot["size"]) == 64 * MiB
    assert boot["md5"] == host_md5
    assert boot["write"] == "ok"
    assert boot["readback_md5"] == boot["write_md5"]
    assert image.md5(write_mib * MiB, 4 * MiB) == boot["write_md5"]
    assert (image.md5(0, write_mib * MiB), image.md5((write_mib + 4) * MiB)) == before_outside
    assert_packed_negotiated(backend.log())


@pytest.mark.timeout(150)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_packed_multiqueue_disk(qemu_version, disk_image, backend_factory, machine_factory):
    image = disk_image(16)
    backend = backend_factory("pyvhost", image, num_queues=4)

    m = machine_factory(qemu_version, [packed_device(backend)], steps=["queues", "md5"], smp=4)
    [boot] = m.wait_for_done(timeout=120)
    check_boot(boot, m)
    assert boot["queues"] == "4"
    assert boot["md5"] == image.md5()
    assert_packed_negotiated(backend.log(), queues=4)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_packed_guest_reboots_reset_the_device(
        qemu_version, disk_image, backend_factory, machine_factory):
    """Each reboot stops the packed rings (GET_VRING_BASE answers the packed
    encoding), resets the device and starts fresh packed rings."""
    image = disk_image(16)
    backend = backend_factory("pyvhost", image)

    m = machine_factory(qemu_version, [packed_device(backend)], steps=["md5", "write"],
                        write_mib=2, reboot=True)
    boots = m.wait_for_done(timeout=170, boots=3)
    m.shutdown()
    assert len(boots) >= 3
    for boot in boots[:3]:
        check_boot(boot, m)
        assert boot["write"] == "ok"
        assert boot["readback_md5"] == boot["write_md5"]
    assert boots[1]["md5"] != boots[0]["md5"]  # each boot sees the previous boot's write
    assert backend.alive()
    trace = backend.log()
    assert_packed_negotiated(trace, starts=3)
    # The kernel's stops answer a packed base whose used half is where the
    # guest's driver is: never the fresh value once I/O was done.
    stops = [int(v, 0) for v in re.findall(r"-> GET_VRING_BASE reply index=0 num=(0x[0-9a-f]+|\d+)",
                                           trace)]
    assert any(v > 0xFFFF and v != FRESH_PACKED_BASE for v in stops), stops
    print(f"QEMU {qemu_version}:\n" + "\n".join(ring_base_lines(trace)))


def ring_base_lines(trace: str) -> list[str]:
    """What the front-end sent about ring positions and the inflight buffer."""
    wanted = ("SET_FEATURES", "VRING_BASE", "INFLIGHT_FD", "started: packed", "started: size")
    return [line.split(": ", 1)[-1] for line in trace.splitlines()
            if any(w in line for w in wanted)]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_packed_behind_a_viommu(qemu_version, disk_image, backend_factory, machine_factory):
    """Packed rings whose descriptor ring, event areas and buffers are IOVAs."""
    image = disk_image(16)
    host_md5 = image.md5()
    write_mib = 4
    backend = backend_factory("pyvhost", image)

    m = machine_factory(qemu_version, [packed_device(backend)], viommu=True,
                        steps=["md5", "write"], write_mib=write_mib)
    [boot] = m.wait_for_done(timeout=170)
    check_boot(boot, m)
    assert m.wait_exit(30) == 0
    assert boot["md5"] == host_md5
    assert boot["write"] == "ok" and boot["readback_md5"] == boot["write_md5"]
    assert image.md5(write_mib * MiB, 4 * MiB) == boot["write_md5"]
    trace = backend.log()
    assert_packed_negotiated(trace)
    assert "<- IOTLB_MSG" in trace
