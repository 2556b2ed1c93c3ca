"""The virtio-blk device alone: chains built from plain buffers, a temp-file image."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from pyvhost_user.devices.blk import BlkDevice
from pyvhost_user.devices.blk.config import BlkConfig
from pyvhost_user.devices.blk.constants import BlkFeature, BlkRequestType as T, BlkStatus
from pyvhost_user.virtqueue import DescriptorChain

SECTOR = 512
IMAGE_BYTES = 4 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_BYTES))
    return path


@pytest.fixture
def device(image):
    dev = BlkDevice(str(image), num_queues=2)
    yield dev
    dev.close()


def chain(readable: list[bytes | bytearray], writable: list[bytearray]) -> DescriptorChain:
    c = DescriptorChain(0)
    c.readable = [memoryview(bytearray(b)) for b in readable]
    c.writable = [memoryview(w) for w in writable]
    c.readable_len = sum(len(b) for b in readable)
    c.writable_len = sum(len(w) for w in writable)
    return c


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def test_config_space_reports_capacity_queues_and_limits(device):
    config = BlkConfig.decode(device.read_config(0, 60))
    assert config.capacity_sectors == IMAGE_BYTES // SECTOR
    assert config.num_queues == 2
    assert config.blk_size == 512  # 0 makes Linux's probe fail
    assert config.seg_max > 0 and config.max_discard_seg == 1
    assert device.read_config(60, 8) == bytes(8)  # past the struct reads as zero


def test_read_spans_several_guest_buffers(device, image):
    a, b, status = bytearray(1024), bytearray(3 * 1024), bytearray(1)
    used = device.process(0, chain([header(T.IN, 8)], [a, b, status]))
    assert used == 4096 + 1 and status[0] == BlkStatus.OK
    assert bytes(a + b) == image.read_bytes()[8 * SECTOR : 8 * SECTOR + 4096]


def test_status_byte_may_share_the_last_buffer(device, image):
    data_and_status = bytearray(SECTOR + 1)
    device.process(0, chain([header(T.IN, 1)], [data_and_status]))
    assert data_and_status[-1] == BlkStatus.OK
    assert bytes(data_and_status[:SECTOR]) == image.read_bytes()[SECTOR : 2 * SECTOR]


def test_write_then_flush_lands_in_the_image(device, image):
    payload = os.urandom(8192)
    status = bytearray(1)
    assert device.process(0, chain([header(T.OUT, 100), payload[:100], payload[100:]], [status])) == 1
    assert status[0] == BlkStatus.OK
    device.process(0, chain([header(T.FLUSH)], [status]))
    assert status[0] == BlkStatus.OK
    assert image.read_bytes()[100 * SECTOR : 100 * SECTOR + 8192] == payload
    assert device.metrics.snapshot()["write_bytes"] == 8192


def test_get_id_returns_the_serial(image):
    dev = BlkDevice(str(image), serial="pyvhost-serial")
    ident, status = bytearray(20), bytearray(1)
    assert dev.process(0, chain([header(T.GET_ID)], [ident, status])) == 21
    assert bytes(ident).rstrip(b"\0") == b"pyvhost-serial"
    dev.close()


def test_write_zeroes_and_discard(device, image):
    status = bytearray(1)
    seg = struct.pack("<QII", 16, 16, 0)
    device.process(0, chain([header(T.WRITE_ZEROES), seg], [status]))
    assert status[0] == BlkStatus.OK
    assert image.read_bytes()[16 * SECTOR : 32 * SECTOR] == bytes(16 * SECTOR)
    device.process(0, chain([header(T.DISCARD), struct.pack("<QII", 64, 8, 0)], [status]))
    assert status[0] == BlkStatus.OK
    assert os.path.getsize(image) == IMAGE_BYTES  # discard keeps the size


@pytest.mark.parametrize(
    ("readable", "writable_sizes", "status"),
    [
        # a read whose data buffer is device-readable (must not "succeed" with no data)
        ([header(T.IN), bytes(SECTOR)], [1], BlkStatus.IOERR),
        # a write whose data is device-writable
        ([header(T.OUT)], [SECTOR, 1], BlkStatus.IOERR),
        # past the end of the disk
        ([header(T.IN, IMAGE_BYTES // SECTOR)], [SECTOR, 1], BlkStatus.IOERR),
        ([header(T.IN, 2**63)], [SECTOR, 1], BlkStatus.IOERR),
        # not a whole sector
        ([header(T.IN)], [100, 1], BlkStatus.IOERR),
        # header too short
        ([b"\0" * 8], [1], BlkStatus.IOERR),
        # unknown request type
        ([header(77)], [1], BlkStatus.UNSUPP),
        # discard with flags, discard past the end, two segments
        ([header(T.DISCARD), struct.pack("<QII", 0, 8, 1)], [1], BlkStatus.UNSUPP),
        ([header(T.DISCARD), struct.pack("<QII", IMAGE_BYTES // SECTOR, 8, 0)], [1], BlkStatus.IOERR),
        ([header(T.DISCARD), struct.pack("<QII", 0, 8, 0) * 2], [1], BlkStatus.IOERR),
    ],
)
def test_bad_requests_get_an_error_status_and_leave_the_image_alone(
    device, image, readable, writable_sizes, status
):
    before = hashlib.md5(image.read_bytes()).hexdigest()
    writable = [bytearray(n) for n in writable_sizes]
    assert device.process(0, chain(readable, writable)) == 1
    assert writable[-1][-1] == status
    assert hashlib.md5(image.read_bytes()).hexdigest() == before
    assert device.metrics.snapshot()["requests_refused"] == 1


def test_request_without_status_byte_is_counted_and_answered_with_nothing(device):
    assert device.process(0, chain([header(T.IN)], [])) == 0
    assert device.metrics.snapshot()["requests_unanswerable"] == 1


def test_read_only_device_refuses_every_write(image):
    dev = BlkDevice(str(image), read_only=True)
    assert dev.device_features & BlkFeature.RO
    assert not dev.device_features & BlkFeature.DISCARD
    before = image.read_bytes()
    for readable in (
        [header(T.OUT), os.urandom(SECTOR)],
        [header(T.WRITE_ZEROES), struct.pack("<QII", 0, 8, 0)],
    ):
        status = bytearray(1)
        dev.process(0, chain(readable, [status]))
        assert status[0] != BlkStatus.OK
    assert image.read_bytes() == before
    dev.close()
