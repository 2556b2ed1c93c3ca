"""The same virtio-blk behaviour from our back-end and from qemu-storage-daemon.

Each test runs against both, driven by the reference front-end as QEMU
would drive them: what passes for the C peer that QEMU ships must pass for
ours.
"""

from __future__ import annotations

import os

import pytest

from pyvhost_user.frontend import BlkDriver, BlkRequest
from pyvhost_user.frontend.blk import SECTOR_SIZE, BlkIOError
from pyvhost_user.wire import FrontendRequest as F

pytestmark = [pytest.mark.peer, pytest.mark.timeout(90)]

KINDS = ["pyvhost", "qsd"]
PROFILES = ["qemu-7.2", "qemu-10.0"]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def sent(driver: BlkDriver, since: int = 0) -> list[str]:
    return [F(m.request).name for d, m in driver.frontend.history[since:] if d == "sent"]


@pytest.mark.parametrize("profile", PROFILES)
def test_read_whole_image(backend_factory, image, kind, profile):
    backend = backend_factory(kind, image)
    with BlkDriver.connect(backend.socket_path, profile=profile) as driver:
        assert driver.config.capacity_bytes == image.stat().st_size
        assert driver.config.blk_size == 512
        assert driver.read_all() == image.read_bytes()


@pytest.mark.parametrize(
    "placement",
    [{}, {"segments": 7}, {"straddle": True}, {"indirect": True}, {"segments": 3, "straddle": True}],
    ids=["plain", "segments", "straddle", "indirect", "segments-straddle"],
)
def test_write_then_verify_on_host(backend_factory, image, kind, placement):
    backend = backend_factory(kind, image)
    data = os.urandom(64 << 10)
    sector = 2048
    with BlkDriver.connect(backend.socket_path) as driver:
        driver.write(sector, data, **placement)
        driver.flush()
        with open(image, "rb") as host:
            host.seek(sector * SECTOR_SIZE)
            assert host.read(len(data)) == data
        assert driver.read(sector, len(data), **placement) == data


def test_indirect_buffer_across_regions_works_on_ours(backend_factory, image):
    # qemu-storage-daemon drops this one (tests/frontend/test_against_qsd.py).
    backend = backend_factory("pyvhost", image)
    data = os.urandom(8192)
    with BlkDriver.connect(backend.socket_path) as driver:
        driver.write(0, data, straddle=True, indirect=True)
        assert driver.read(0, 8192, straddle=True, indirect=True) == data


@pytest.mark.parametrize("queues", [1, 4])
def test_queue_depth_32(backend_factory, image, kind, queues):
    backend = backend_factory(kind, image, num_queues=queues)
    size = image.stat().st_size
    expected = bytearray(image.read_bytes())
    blocks = {(i * 97 % (size // 4096)) * 4096: os.urandom(4096) for i in range(256)}
    for offset, data in blocks.items():
        expected[offset : offset + 4096] = data
    with BlkDriver.connect(backend.socket_path, num_queues=queues, queue_size=128) as driver:
        requests = [
            BlkRequest.write(off // SECTOR_SIZE, d, queue=i % queues)
            for i, (off, d) in enumerate(blocks.items())
        ]
        tickets = driver.submit(requests[: 32 * queues])
        assert driver.in_flight == len(tickets)
        driver.wait(tickets)
        driver.run(requests[32 * queues :], depth=32)
        driver.flush()
        assert image.read_bytes() == bytes(expected)
        assert driver.read_all() == bytes(expected)


@pytest.mark.parametrize("profile", PROFILES)
def test_reboot_keeps_memory_and_serves_again(backend_factory, image, kind, profile):
    backend = backend_factory(kind, image)
    with BlkDriver.connect(backend.socket_path, profile=profile) as driver:
        assert driver.read(0, 4096) == image.read_bytes()[:4096]
        for _ in range(3):
            mark = len(driver.frontend.history)
            driver.reboot()
            requests = sent(driver, mark)
            assert "ADD_MEM_REG" not in requests and "SET_MEM_TABLE" not in requests
            assert driver.read_all() == image.read_bytes()


def test_set_mem_table_mode(backend_factory, image, kind):
    backend = backend_factory(kind, image)
    with BlkDriver.connect(backend.socket_path, memory_mode="table") as driver:
        assert "SET_MEM_TABLE" in sent(driver) and "ADD_MEM_REG" not in sent(driver)
        assert driver.read(100, 8192, straddle=True) == image.read_bytes()[51200 : 51200 + 8192]


def test_stop_and_restart_a_queue(backend_factory, image, kind):
    backend = backend_factory(kind, image)
    data = os.urandom(8192)
    with BlkDriver.connect(backend.socket_path) as driver:
        for i in range(5):
            driver.write(i * 16, data)
        assert driver.frontend.stop_queue(0) == 5  # every request consumed
        driver.frontend.start_queue(0)
        assert driver.read(0, 8192) == data


def test_get_id_discard_write_zeroes(backend_factory, image, kind):
    backend = backend_factory(kind, image)
    with BlkDriver.connect(backend.socket_path) as driver:
        assert driver.get_id()
        driver.write_zeroes(64, 16)
        assert driver.read(64, 16 * SECTOR_SIZE) == bytes(16 * SECTOR_SIZE)
        driver.discard(128, 8)
        driver.flush()
        with open(image, "rb") as host:
            host.seek(64 * SECTOR_SIZE)
            assert host.read(16 * SECTOR_SIZE) == bytes(16 * SECTOR_SIZE)


def test_read_only_refuses_writes(backend_factory, image, kind):
    before = image.read_bytes()
    backend = backend_factory(kind, image, read_only=True)
    with BlkDriver.connect(backend.socket_path) as driver:
        with pytest.raises(BlkIOError):
            driver.write(0, os.urandom(4096))
        assert driver.read(0, 4096) == before[:4096]
    assert image.read_bytes() == before


def test_more_queues_than_offered_is_refused_like_qemu(backend_factory, image, kind):
    backend = backend_factory(kind, image, num_queues=1)
    with pytest.raises(Exception, match="maximum number of queues supported by the backend is 1"):
        BlkDriver.connect(backend.socket_path, num_queues=2)


def test_serial_option_is_what_get_id_returns(backend_factory, image):
    backend = backend_factory("pyvhost", image, extra_args=("--serial", "disk-serial-42"))
    with BlkDriver.connect(backend.socket_path) as driver:
        assert driver.get_id().rstrip(b"\0") == b"disk-serial-42"
