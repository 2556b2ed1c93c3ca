"""Packed rings against the real back-end process, driven by the reference front-end.

The same virtio-blk behaviour as over split rings (whole-image md5, writes
read back and found on the host, several queues), ring stop and restart from
the packed base the back-end answered, and a back-end that dies and is
replaced: QEMU then sends the base of its last orderly stop (it keeps no
packed used index in guest memory), so the new back-end must take the used
position from the inflight buffer, and serve what was left in the ring.
"""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from pyvhost_user.frontend import BlkDriver, BlkRequest, Frontend
from pyvhost_user.frontend.blk import BLK_CONFIG_SIZE, SECTOR_SIZE
from pyvhost_user.frontend.packed_ring import PackedRing
from pyvhost_user.launch.backends import (
    BackendProcess,
    freeze_backend,
    kill_backend,
    restart_backend,
    start_backend,
)
from pyvhost_user.virtqueue.packed import decode_base
from pyvhost_user.wire import ProtocolFeature as PF
from pyvhost_user.wire import VirtioFeature as VF

pytestmark = [pytest.mark.timeout(90)]

PROFILES = ["qemu-7.2", "qemu-10.0"]
STALE_PACKED_BASE = 0x8000_8000  # what QEMU resends for a packed ring after a crash


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("queue_size", [128, 37])
def test_whole_image_md5_over_packed_rings(backend_factory, image, profile, queue_size):
    backend = backend_factory("pyvhost", image)
    with BlkDriver.connect(backend.socket_path, profile=profile, packed=True,
                           queue_size=queue_size) as driver:
        assert driver.packed and driver.features & VF.RING_PACKED
        assert isinstance(driver.ring(0), PackedRing)
        assert md5(driver.read_all(depth=8)) == md5(image.read_bytes())
    assert "ring 0 started: packed" in backend.log()


@pytest.mark.parametrize(
    "placement",
    [{}, {"segments": 7}, {"straddle": True}, {"indirect": True}, {"segments": 3, "straddle": True}],
    ids=["plain", "segments", "straddle", "indirect", "segments-straddle"],
)
def test_write_then_verify_on_host(backend_factory, image, placement):
    backend = backend_factory("pyvhost", image)
    data = os.urandom(64 << 10)
    sector = 2048
    with BlkDriver.connect(backend.socket_path, packed=True) as driver:
        driver.write(sector, data, **placement)
        driver.flush()
        with open(image, "rb") as host:
            host.seek(sector * SECTOR_SIZE)
            assert host.read(len(data)) == data
        assert driver.read(sector, len(data), **placement) == data


def test_several_queues_deep_and_out_of_order(backend_factory, image):
    """4 queues, 32 requests in flight on each, on rings that wrap many times."""
    backend = backend_factory("pyvhost", image, num_queues=4)
    size = image.stat().st_size
    expected = bytearray(image.read_bytes())
    blocks = {(i * 97 % (size // 4096)) * 4096: os.urandom(4096) for i in range(512)}
    for offset, data in blocks.items():
        expected[offset : offset + 4096] = data
    with BlkDriver.connect(backend.socket_path, num_queues=4, queue_size=50,
                           packed=True) as driver:
        requests = [BlkRequest.write(off // SECTOR_SIZE, d, queue=i % 4)
                    for i, (off, d) in enumerate(blocks.items())]
        driver.run(requests, depth=16)
        assert md5(driver.read_all(depth=16)) == md5(bytes(expected))
    assert image.read_bytes() == bytes(expected)
    trace = backend.log()
    assert all(f"ring {q} started: packed" in trace for q in range(4))
    assert "marked broken" not in trace


@pytest.mark.parametrize("profile", PROFILES)
def test_stop_and_restart_from_the_packed_base(backend_factory, image, profile):
    backend = backend_factory("pyvhost", image)
    data = os.urandom(4096)
    with BlkDriver.connect(backend.socket_path, profile=profile, packed=True,
                           queue_size=10) as driver:
        for i in range(7):  # 3 descriptors each: 21 = two laps and 1
            driver.write(i * 8, data)
        ring = driver.ring(0)
        base = driver.frontend.stop_queue(0)
        assert decode_base(base) == (ring.next_used, ring.used_wrap,
                                     ring.next_used, ring.used_wrap) == (1, True, 1, True)
        driver.frontend.start_queue(0)  # sends that base back
        assert driver.read(0, 4096) == data
        driver.reboot()  # a device reset: fresh packed rings from 0x80008000 again
        assert driver.read(8, 4096) == data
    trace = backend.log()
    assert f"<- SET_VRING_BASE index=0 num={base:#x}" in trace
    assert trace.count("num=0x80008000") >= 2


@pytest.fixture
def crashing_backend(request, sock_dir, image):
    """Our back-end, and the ones that replace it (killed ones end with SIGKILL,
    which backend_factory would report): the failure report shows their logs."""
    started: list[BackendProcess] = []
    request.node.started_backends = started
    started.append(start_backend("pyvhost", image, sock_dir / "blk.sock"))
    yield started
    for backend in started:
        if backend.alive():
            backend.process.send_signal(signal.SIGCONT)  # one we froze, if the test failed
            assert backend.stop() == 0


def crash_and_replace(started: list[BackendProcess]) -> BackendProcess:
    kill_backend(started[-1])
    started.append(restart_backend(started[-1]))
    return started[-1]


def reconnect(driver: BlkDriver, socket_path, stale_base: bool, monkeypatch) -> Frontend:
    """What QEMU does once a new back-end listens: handshake, the same inflight
    buffer, the guest's rings where they are, and (packed) the stale base."""
    old = driver.frontend
    frontend = Frontend.connect(socket_path, old.ram, profile=old.profile.name)
    frontend.handshake(num_queues=driver.num_queues, config_size=BLK_CONFIG_SIZE)
    frontend.inflight = old.inflight
    for index in range(driver.num_queues):
        frontend.queue(index).ring = old.queue(index).ring
    if stale_base:
        with monkeypatch.context() as patch:
            patch.setattr(PackedRing, "start_base", property(lambda ring: STALE_PACKED_BASE))
            frontend.start_device([driver.queue_size] * driver.num_queues, driver.driver_features)
    else:
        frontend.start_device([driver.queue_size] * driver.num_queues, driver.driver_features)
    driver.frontend = frontend
    return old


def test_new_backend_takes_the_used_position_from_the_inflight_buffer(
        crashing_backend, image, monkeypatch):
    backend = crashing_backend[0]
    data = [os.urandom(4096) for _ in range(9)]
    driver = BlkDriver.connect(backend.socket_path, packed=True, queue_size=8)
    old = driver.frontend
    try:
        assert driver.frontend.has_protocol_feature(PF.INFLIGHT_SHMFD)
        for i, block in enumerate(data):  # 27 descriptors: three laps and 3
            driver.write(i * 8, block)
        ring = driver.ring(0)
        assert (ring.next_used, ring.used_wrap) == (3, False)
        backend = crash_and_replace(crashing_backend)
        reconnect(driver, backend.socket_path, True, monkeypatch)
        for i, block in enumerate(data):
            assert driver.read(i * 8, 4096) == block
        assert "resuming at 3 wrap 0, used 3 wrap 0" in backend.log()
    finally:
        driver.frontend.close()
        if driver.frontend is not old:
            old.close()


def test_requests_left_in_the_ring_are_served_by_the_next_backend(
        crashing_backend, image, monkeypatch):
    """Requests made available while the back-end hangs, then it dies: the next
    one finds them after the recorded used position and completes them."""
    backend = crashing_backend[0]
    driver = BlkDriver.connect(backend.socket_path, packed=True, queue_size=8)
    old = driver.frontend
    try:
        for i in range(5):
            driver.write(i * 8, os.urandom(4096))  # 15 descriptors: positions move on
        freeze_backend(backend)
        writes = {100 + 8 * i: os.urandom(4096) for i in range(2)}
        tickets = driver.submit([BlkRequest.write(s, d) for s, d in writes.items()])
        backend = crash_and_replace(crashing_backend)
        reconnect(driver, backend.socket_path, True, monkeypatch)
        for completion in driver.wait(tickets, timeout=20):
            completion.check()
        for sector, block in writes.items():
            assert driver.read(sector, 4096) == block
        with open(image, "rb") as host:
            for sector, block in writes.items():
                host.seek(sector * SECTOR_SIZE)
                assert host.read(4096) == block
    finally:
        driver.frontend.close()
        if driver.frontend is not old:
            old.close()


def test_dirty_log_marks_the_descriptor_ring_where_used_descriptors_go(backend_factory, image):
    """With LOG_ALL (migration), a packed ring's device writes go to the descriptor
    ring, not only to the device area QEMU names as log_guest_addr: both are logged."""
    import mmap
    import struct

    from pyvhost_user.wire import FrontendRequest as F
    from pyvhost_user.wire import LogDescription

    page = 4096
    backend = backend_factory("pyvhost", image)
    with BlkDriver.connect(backend.socket_path, packed=True, queue_size=256) as driver:
        fe, ring = driver.frontend, driver.ring(0)
        assert ring.desc_gpa // page != ring.device_gpa // page
        top = max(r.gpa + r.size for r in driver.ram.regions)
        size = (top // page + 7) // 8
        fd = os.memfd_create("dirty-log")
        os.ftruncate(fd, size)
        log = mmap.mmap(fd, size)
        with fe.exchange():
            fe.send_raw(struct.pack("<III", F.SET_LOG_BASE, 1, 16)
                        + LogDescription(size, 0).encode(), [fd])
            assert fe.receive_reply(F.SET_LOG_BASE).payload.value == 0
        os.close(fd)
        fe.set_features(fe.acked_features | VF.VHOST_F_LOG_ALL)
        fe.set_vring_addr(0, ring.desc_user_addr, ring.used_user_addr, ring.avail_user_addr,
                          log_guest_addr=ring.device_gpa)

        def logged(gpa: int) -> bool:
            n = gpa // page
            return bool(log[n >> 3] & (1 << (n & 7)))

        assert driver.read(0, 4096) == image.read_bytes()[:4096]
        assert logged(ring.desc_gpa) and logged(ring.device_gpa)
