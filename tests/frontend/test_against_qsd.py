"""The reference front-end against qemu-storage-daemon: the peer that QEMU itself uses.

If these pass, the front-end speaks vhost-user well enough for a C backend
that real QEMU drives; tests of our backend can then trust it. What both
back-ends must do alike is in tests/integration/test_blk_backends.py; this
module keeps what is particular to qemu-storage-daemon (its exact feature
set and its quirks, each pinned so a change in the peer shows).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvhost_user.frontend import BlkDriver, FrontendTimeout
from pyvhost_user.wire import FrontendRequest as F

pytestmark = [pytest.mark.peer, pytest.mark.timeout(60)]

PROFILES = ["qemu-7.2", "qemu-10.0"]
# What qemu-storage-daemon offers (facts page): MQ, LOG_SHMFD, REPLY_ACK,
# BACKEND_REQ, PAGEFAULT, CONFIG, BACKEND_SEND_FD, HOST_NOTIFIER, CONFIGURE_MEM_SLOTS.
QSD_PROTOCOL_FEATURES = 0x8F2B


def sent_requests(driver: BlkDriver, since: int = 0) -> list[str]:
    return [F(m.request).name for d, m in driver.frontend.history[since:] if d == "sent"]


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


def test_restart_without_new_kick_and_call_is_not_served(qsd, image):
    """The qsd quirk the facts page warns about: GET_VRING_BASE drops kick and call."""
    export = qsd(image)
    with BlkDriver.connect(export.socket_path) as driver:
        driver.frontend.stop_queue(0)
        driver.frontend.set_vring_enable(0, True)
        with pytest.raises(FrontendTimeout):
            driver.read(0, 512, timeout=1.0)


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
