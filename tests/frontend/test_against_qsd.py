"""The reference front-end against qemu-storage-daemon: the peer that QEMU itself uses.

If these pass, the front-end speaks vhost-user well enough for a C backend
that real QEMU drives; tests of our backend can then trust it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvhost_user.frontend import BlkDriver, BlkRequest, FrontendTimeout
from pyvhost_user.frontend.blk import SECTOR_SIZE
from pyvhost_user.wire import FrontendRequest as F

pytestmark = [pytest.mark.peer, pytest.mark.timeout(60)]

PROFILES = ["qemu-7.2", "qemu-10.0"]
# What qemu-storage-daemon offers (facts page): MQ, LOG_SHMFD, REPLY_ACK,
# BACKEND_REQ, PAGEFAULT, CONFIG, BACKEND_SEND_FD, HOST_NOTIFIER, CONFIGURE_MEM_SLOTS.
QSD_PROTOCOL_FEATURES = 0x8F2B
CHUNK = 128 << 10


def sent_requests(driver: BlkDriver, since: int = 0) -> list[str]:
    return [F(m.request).name for d, m in driver.frontend.history[since:] if d == "sent"]


def read_whole(driver: BlkDriver, size: int, queues: int = 1, depth: int = 32) -> bytes:
    requests = [
        BlkRequest.read(offset // SECTOR_SIZE, min(CHUNK, size - offset), queue=i % queues)
        for i, offset in enumerate(range(0, size, CHUNK))
    ]
    return b"".join(c.data for c in driver.run(requests, depth))


@pytest.fixture
def image(random_image) -> Path:
    return random_image(32)


@pytest.mark.parametrize("profile", PROFILES)
def test_handshake_and_driver_start_match_qemu(qsd, image, profile):
    export = qsd(image)
    with BlkDriver.connect(export.socket_path, profile=profile) as driver:
        assert sent_requests(driver) == [
            "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
            "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES",
            "SET_VRING_CALL", "SET_VRING_ERR", "GET_CONFIG",
            "SET_FEATURES", "SET_VRING_CALL", "SET_FEATURES",
            "ADD_MEM_REG", "ADD_MEM_REG", "ADD_MEM_REG",
            "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
            "SET_VRING_ENABLE",
        ]
        enables = [m for d, m in driver.frontend.history if m.request == F.SET_VRING_ENABLE]
        assert enables[0].need_reply == (profile == "qemu-10.0")
        assert driver.frontend.offered_protocol_features == QSD_PROTOCOL_FEATURES
        assert driver.frontend.protocol_features == QSD_PROTOCOL_FEATURES
        assert driver.config.capacity_bytes == image.stat().st_size
        assert driver.config.blk_size == 512 and driver.config.num_queues == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_read_whole_image(qsd, image, profile):
    export = qsd(image)
    with BlkDriver.connect(export.socket_path, profile=profile) as driver:
        assert read_whole(driver, image.stat().st_size) == image.read_bytes()


@pytest.mark.parametrize(
    "placement",
    [{}, {"segments": 7}, {"straddle": True}, {"indirect": True},
     {"segments": 3, "straddle": True}, {"segments": 2, "straddle": True, "indirect": True}],
    ids=["plain", "segments", "straddle", "indirect", "segments-straddle",
         "indirect-straddle-at-segment-edge"],
)
def test_write_then_verify_on_host(qsd, image, placement):
    export = qsd(image)
    data = os.urandom(64 << 10)
    sector = 2048
    with BlkDriver.connect(export.socket_path) as driver:
        driver.write(sector, data, **placement)
        driver.flush()
        with open(image, "rb") as host:
            host.seek(sector * SECTOR_SIZE)
            assert host.read(len(data)) == data
        assert driver.read(sector, len(data), **placement) == data
        assert driver.ram.allocated_bytes == sum(  # only the rings are left allocated
            16 * r.size + 6 + 2 * r.size + 6 + 8 * r.size for r in driver.frontend.rings()
        )


@pytest.mark.parametrize("queues", [1, 4])
def test_queue_depth_32(qsd, image, queues):
    export = qsd(image, num_queues=queues)
    size = image.stat().st_size
    expected = bytearray(image.read_bytes())
    with BlkDriver.connect(export.socket_path, num_queues=queues, queue_size=128) as driver:
        writes = []
        for i in range(256):
            offset = (i * 97 % (size // 4096)) * 4096
            data = os.urandom(4096)
            expected[offset : offset + 4096] = data
            writes.append((offset, data))
        # Overlapping writes may complete in any order: keep them in distinct blocks
        # per batch by writing each block once.
        unique = {offset: data for offset, data in writes}
        requests = [BlkRequest.write(off // SECTOR_SIZE, d, queue=i % queues)
                    for i, (off, d) in enumerate(unique.items())]
        tickets = driver.submit(requests[:32 * queues])
        assert driver.in_flight == len(tickets)
        driver.wait(tickets)
        driver.run(requests[32 * queues:], depth=32)
        driver.flush()
        assert image.read_bytes() == bytes(expected)
        assert read_whole(driver, size, queues) == bytes(expected)


def test_reboot_keeps_memory_and_serves_again(qsd, image):
    export = qsd(image)
    with BlkDriver.connect(export.socket_path) as driver:
        assert driver.read(0, 4096) == image.read_bytes()[:4096]
        mark = len(driver.frontend.history)
        driver.reboot()
        sent = sent_requests(driver, mark)
        assert sent[:2] == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
        assert "ADD_MEM_REG" not in sent and "SET_MEM_TABLE" not in sent
        assert read_whole(driver, image.stat().st_size) == image.read_bytes()


def test_set_mem_table_mode(qsd, image):
    export = qsd(image)
    with BlkDriver.connect(export.socket_path, memory_mode="table") as driver:
        assert "SET_MEM_TABLE" in sent_requests(driver)
        assert "ADD_MEM_REG" not in sent_requests(driver)
        assert driver.read(100, 8192, straddle=True) == image.read_bytes()[51200:51200 + 8192]


def test_stop_and_restart_a_queue(qsd, image):
    export = qsd(image)
    data = os.urandom(8192)
    with BlkDriver.connect(export.socket_path) as driver:
        for i in range(5):
            driver.write(i * 16, data)
        base = driver.frontend.stop_queue(0)
        assert base == 5  # every request was consumed
        # qemu-storage-daemon closed its kick and call fds: start_queue sends them again.
        driver.frontend.start_queue(0)
        assert driver.read(0, 8192) == data


def test_restart_without_new_kick_and_call_is_not_served(qsd, image):
    """The qsd quirk the facts page warns about: GET_VRING_BASE drops kick and call."""
    export = qsd(image)
    with BlkDriver.connect(export.socket_path) as driver:
        driver.frontend.stop_queue(0)
        driver.frontend.set_vring_enable(0, True)
        with pytest.raises(FrontendTimeout):
            driver.read(0, 512, timeout=1.0)


def test_get_id_discard_write_zeroes(qsd, image):
    export = qsd(image)
    with BlkDriver.connect(export.socket_path) as driver:
        assert driver.get_id().startswith(b"vhost_user_blk")
        driver.write_zeroes(64, 16)
        assert driver.read(64, 16 * SECTOR_SIZE) == bytes(16 * SECTOR_SIZE)
        driver.discard(128, 8)
        driver.flush()
        with open(image, "rb") as host:
            host.seek(64 * SECTOR_SIZE)
            assert host.read(16 * SECTOR_SIZE) == bytes(16 * SECTOR_SIZE)


def test_raw_chain_and_timeout_on_dropped_request(qsd, image):
    export = qsd(image)
    with BlkDriver.connect(export.socket_path) as driver:
        ram = driver.ram
        header, data, status = ram.alloc(16), ram.alloc(512), ram.alloc(1)
        ram.write(header, (0).to_bytes(4, "little") + bytes(4) + (3).to_bytes(8, "little"))
        chain = [(header, 16, False), (data, 512, True), (status, 1, True)]
        assert driver.raw(chain) == (513, 0)  # used.len = data + status byte
        assert ram.read(data, 512) == image.read_bytes()[3 * 512 : 4 * 512]
        # No separate status descriptor: the status is the last writable byte (here of
        # a 511-byte read, which is refused: IOERR).
        assert driver.raw([(header, 16, False), (data, 512, True)]) == (512, 1)
        # Nothing device-writable: qemu-storage-daemon drops the request silently.
        with pytest.raises(FrontendTimeout):
            driver.raw([(header, 16, False), (data, 512, False)], timeout=0.5)
        assert "virtio-blk request missing headers" in export.log()


def test_indirect_buffer_across_regions_is_a_looped_descriptor_to_qsd(qsd, image):
    """A libvhost-user bug (seen with 7.2): in an indirect table, a buffer that crosses
    a memory-region boundary maps to two iovecs, the loop check counts iovecs against
    the table's descriptor count, and the device panics ("Looped descriptor")."""
    export = qsd(image)
    with BlkDriver.connect(export.socket_path) as driver:
        with pytest.raises(FrontendTimeout):
            driver.write(0, os.urandom(8192), straddle=True, indirect=True, timeout=1.0)
    assert "vu_panic: Looped descriptor" in export.log()


def test_more_queues_than_offered_is_refused_like_qemu(qsd, image):
    export = qsd(image, num_queues=1)
    with pytest.raises(Exception, match="maximum number of queues supported by the backend is 1"):
        BlkDriver.connect(export.socket_path, num_queues=2)
