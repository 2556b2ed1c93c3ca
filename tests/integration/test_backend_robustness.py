"""Bad input against the real back-end process: refused, logged, process alive.

Every test ends by proving the back-end still serves a fresh front-end with
correct data (``assert_serves_next``), and the fixture checks that SIGTERM
then ends it cleanly.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct

import pytest

from pyvhost_user.frontend import BlkDriver, BlkRequest, Frontend
from pyvhost_user.frontend.blk import SECTOR_SIZE
from pyvhost_user.frontend.errors import BackendClosed, FrontendTimeout
from pyvhost_user.frontend.split_ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvhost_user.wire import FrontendRequest as F

pytestmark = pytest.mark.timeout(60)

BLK_IN = 0


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_serves_next(backend, image) -> None:
    assert backend.alive(), backend.log()[-2000:]
    with BlkDriver.connect(backend.socket_path) as driver:
        assert driver.read(0, 1 << 20) == image.read_bytes()[: 1 << 20]


def wait_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def raw_header(code: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("<III", code, flags, len(payload)) + payload


def test_malformed_message_is_nacked_and_the_session_goes_on(pyvhost, image):
    with BlkDriver.connect(pyvhost.socket_path) as driver:
        fe = driver.frontend
        # SET_VRING_NUM with a 4-byte payload (needs 8), asking for an ack.
        fe.send_raw(raw_header(F.SET_VRING_NUM, 0x9, b"\0" * 4))
        reply = fe.receive_reply(F.SET_VRING_NUM)
        assert reply.payload.value != 0
        assert driver.read(8, 4096) == image.read_bytes()[4096:8192]
    assert "malformed message refused: SET_VRING_NUM" in pyvhost.log()
    assert_serves_next(pyvhost, image)


def test_broken_framing_drops_the_connection_only(pyvhost, image):
    fe = Frontend.connect(pyvhost.socket_path)
    fe.send_raw(struct.pack("<III", F.GET_FEATURES, 0x2, 0))  # version 2
    with pytest.raises(BackendClosed):
        fe.receive(timeout=5)
    fe.close()
    assert "protocol framing broken" in pyvhost.log()
    assert_serves_next(pyvhost, image)


def test_unmappable_memory_fd_is_refused(pyvhost, image):
    fe = Frontend.connect(pyvhost.socket_path)
    fe.handshake()
    region = fe.ram.regions[0].mem_region()
    r, w = os.pipe()
    payload = bytes(8) + region.encode()
    fe.send_raw(raw_header(F.ADD_MEM_REG, 0x9, payload), [r])
    assert fe.receive_reply(F.ADD_MEM_REG).payload.value != 0
    os.close(r)
    os.close(w)
    fe.close()
    assert "refused ADD_MEM_REG" in pyvhost.log()
    assert "is not a file that can be mapped" in pyvhost.log()  # a pipe
    assert_serves_next(pyvhost, image)


def test_missing_fds_are_refused(pyvhost, image):
    fe = Frontend.connect(pyvhost.socket_path)
    fe.handshake()
    fe.send_raw(raw_header(F.ADD_MEM_REG, 0x9, bytes(8) + fe.ram.regions[0].mem_region().encode()))
    assert fe.receive_reply(F.ADD_MEM_REG).payload.value != 0
    fe.close()
    assert "ADD_MEM_REG: needs 1 fd(s), got 0" in pyvhost.log()
    assert_serves_next(pyvhost, image)


@pytest.mark.parametrize(
    "chain",
    [
        "outside-memory",
        "loop",
        "next-out-of-range",
    ],
)
def test_broken_chain_marks_the_queue_broken_and_signals_err(pyvhost, image, chain):
    with BlkDriver.connect(pyvhost.socket_path) as driver:
        ring = driver.ring(0)
        header = driver.ram.alloc(16)
        driver.ram.write(header, struct.pack("<IIQ", BLK_IN, 0, 0))
        ids = ring.take_descriptors(2)
        if chain == "outside-memory":
            ring.write_descriptor(ids[0], header, 16, VIRTQ_DESC_F_NEXT, ids[1])
            ring.write_descriptor(ids[1], 0x2_0000_0000, 513, VIRTQ_DESC_F_WRITE, 0)  # in the hole
        elif chain == "loop":
            ring.write_descriptor(ids[0], header, 16, VIRTQ_DESC_F_NEXT, ids[1])
            ring.write_descriptor(ids[1], header, 16, VIRTQ_DESC_F_NEXT, ids[0])
        else:
            ring.write_descriptor(ids[0], header, 16, VIRTQ_DESC_F_NEXT, 1000)
        ring.push_avail(ids[0], ids)
        ring.publish()
        driver.frontend.kick(0)
        err_fd = driver.frontend.queue(0).err_fd
        assert wait_readable(err_fd, 10), "the error eventfd was not signalled"
        assert ring.used_idx == 0  # nothing completed from a chain that cannot be walked
        assert driver.frontend.get_status() & 0x40  # DEVICE_NEEDS_RESET
    assert "marked broken (device needs reset)" in pyvhost.log()
    assert_serves_next(pyvhost, image)


def test_read_into_a_device_readable_buffer_fails_and_writes_nothing(pyvhost, image):
    before = md5(image)
    with BlkDriver.connect(pyvhost.socket_path) as driver:
        header, data, status = driver.ram.alloc(16), driver.ram.alloc(4096), driver.ram.alloc(1)
        driver.ram.write(header, struct.pack("<IIQ", BLK_IN, 0, 0))
        driver.ram.write(data, b"\xAA" * 4096)
        used, got = driver.raw(
            [(header, 16, False), (data, 4096, False), (status, 1, True)], status_gpa=status
        )
        assert got == 1 and used == 1  # IOERR, only the status written
        assert driver.ram.read(data, 4096) == b"\xAA" * 4096
    assert md5(image) == before
    assert "request refused (IOERR): IN carries 4096 device-readable data bytes" in pyvhost.log()
    assert_serves_next(pyvhost, image)


def test_front_end_vanishing_mid_message(pyvhost, image):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(pyvhost.socket_path))
    sock.sendall(struct.pack("<III", F.SET_FEATURES, 1, 8) + b"\0\0")  # 2 of 8 payload bytes
    sock.close()
    assert_serves_next(pyvhost, image)
    assert "mid-message" in pyvhost.log()


def test_front_end_vanishing_mid_io_leaves_a_consistent_image(pyvhost, image):
    original = image.read_bytes()
    data = os.urandom(64 << 10)
    block = len(data)
    driver = BlkDriver.connect(pyvhost.socket_path, queue_size=128)
    driver.submit([BlkRequest.write(i * block // SECTOR_SIZE, data) for i in range(32)])
    driver.frontend.sock.close()  # gone, with writes in flight
    assert_serves_next(pyvhost, image)
    # Each write the back-end took was carried out whole (the worker finishes the
    # request it is on before the session ends); the others were never started.
    content = image.read_bytes()
    for i in range(32):
        got = content[i * block : (i + 1) * block]
        assert got in (data, original[i * block : (i + 1) * block]), f"block {i} is torn"
    assert content[32 * block :] == original[32 * block :]
    driver.ram.close()


def test_second_front_end_is_refused_while_one_is_connected(pyvhost, image):
    with BlkDriver.connect(pyvhost.socket_path) as driver:
        intruder = Frontend.connect(pyvhost.socket_path)
        with pytest.raises((BackendClosed, FrontendTimeout, OSError)):
            intruder.get_features()
        intruder.close()
        assert driver.read(0, 4096) == image.read_bytes()[:4096]
    assert "refused a second front-end" in pyvhost.log()
    assert_serves_next(pyvhost, image)


def test_refused_request_with_a_value_reply_closes_instead_of_lying(pyvhost, image):
    fe = Frontend.connect(pyvhost.socket_path)
    fe.handshake()
    with pytest.raises(BackendClosed):
        fe.get_vring_base(7)  # no ring 7: no truthful answer exists
    fe.close()
    assert "refused GET_VRING_BASE: ring index 7" in pyvhost.log()
    assert_serves_next(pyvhost, image)
