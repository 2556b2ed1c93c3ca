"""Dirty logging, as QEMU turns it on at migration start, against the real back-end."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from pyvhost_user.frontend import BlkDriver
from pyvhost_user.wire import FrontendRequest as F, LogDescription, VirtioFeature as VF

pytestmark = pytest.mark.timeout(60)
PAGE = 4096
BLK_IN, BLK_OUT = 0, 1


def log_bit(log: mmap.mmap, gpa: int) -> bool:
    page = gpa // PAGE
    return bool(log[page >> 3] & (1 << (page & 7)))


def start_logging(driver: BlkDriver) -> mmap.mmap:
    """What QEMU sends at migration start: SET_LOG_BASE (a reply is due although no
    NEED_REPLY is set), SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag."""
    fe = driver.frontend
    top = max(r.gpa + r.size for r in driver.ram.regions)
    size = (top // PAGE + 7) // 8
    fd = os.memfd_create("dirty-log")
    os.ftruncate(fd, size)
    log = mmap.mmap(fd, size)
    with fe.exchange():
        fe.send_raw(struct.pack("<III", F.SET_LOG_BASE, 1, 16) + LogDescription(size, 0).encode(),
                    [fd])
        assert fe.receive_reply(F.SET_LOG_BASE).payload.value == 0
    os.close(fd)
    fe.set_features(fe.acked_features | VF.VHOST_F_LOG_ALL)
    ring = driver.ring(0)
    fe.set_vring_addr(0, ring.desc_user_addr, ring.used_user_addr, ring.avail_user_addr,
                      log_guest_addr=ring.used_gpa)
    return log


def test_pages_the_device_writes_and_the_used_ring_are_logged(backend_factory, image):
    backend = backend_factory("pyvhost", image)
    with BlkDriver.connect(backend.socket_path) as driver:
        ram = driver.ram
        log = start_logging(driver)
        hdr, status = ram.alloc(16), ram.alloc(1)
        data = ram.alloc(3 * PAGE, PAGE)
        source = ram.alloc(PAGE, PAGE)
        untouched = ram.alloc(PAGE, PAGE)
        ram.write(hdr, struct.pack("<IIQ", BLK_IN, 0, 8))
        used_len, got = driver.raw([(hdr, 16, False), (data, 3 * PAGE, True), (status, 1, True)],
                                   status_gpa=status)
        assert got == 0 and used_len == 3 * PAGE + 1
        assert ram.read(data, 3 * PAGE) == image.read_bytes()[8 * 512 : 8 * 512 + 3 * PAGE]
        assert all(log_bit(log, data + i * PAGE) for i in range(3))
        assert log_bit(log, status)
        assert log_bit(log, driver.ring(0).used_gpa)
        # A write request: the device only reads its data page: not logged.
        ram.write(hdr, struct.pack("<IIQ", BLK_OUT, 0, 64))
        driver.raw([(hdr, 16, False), (source, PAGE, False), (status, 1, True)],
                   status_gpa=status)
        assert not log_bit(log, source) and not log_bit(log, untouched)
    assert "dirty log:" in backend.log() and "used-ring logging on" in backend.log()


def test_without_log_all_nothing_is_logged(backend_factory, image):
    backend = backend_factory("pyvhost", image)
    with BlkDriver.connect(backend.socket_path) as driver:
        log = start_logging(driver)
        driver.frontend.set_features(driver.frontend.acked_features & ~VF.VHOST_F_LOG_ALL)
        driver.frontend.get_features()  # a round trip: SET_FEATURES has been handled
        log[:] = bytes(len(log))
        assert driver.read(0, PAGE) == image.read_bytes()[:PAGE]
        assert not any(log[:])
