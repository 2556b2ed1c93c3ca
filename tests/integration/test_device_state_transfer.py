"""Device state transfer (live migration's SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE)
between real back-end processes on one image.

The source's front-end maps two ASIDs and binds the blk group to ASID 1,
suspends the device (rings stopped, no device reset), saves the back-end's
state through a pipe; the destination's front-end, whose guest RAM sits at
other user addresses, loads it before it sends its memory table (QEMU's order)
and starts the device without a single IOTLB message. Then every way a
transfer can be wrong is refused, with a log line, by a back-end that lives
on and serves the next front-end.
"""

from __future__ import annotations

import os
import re
import struct
import zlib

import pytest

from pyvhost_user.control.client import ControlClient
from pyvhost_user.frontend import BlkDriver, Frontend, GuestRam, Iommu
from pyvhost_user.frontend.blk import BLK_CONFIG_SIZE, BLK_DRIVER_FEATURES
from pyvhost_user.frontend.errors import BackendRefused
from pyvhost_user.frontend.guest_ram import DEFAULT_LAYOUT, PAGE_SIZE
from pyvhost_user.frontend.iommu import IOVA_OFFSET
from pyvhost_user.server.device_state import HEADER
from pyvhost_user.wire import (
    DEVICE_STATE_REPLY_NO_FD,
    DeviceStateDirection,
    FrontendRequest as F,
    ProtocolFeature as PF,
    U64,
)

pytestmark = pytest.mark.timeout(90)

KiB = 1 << 10
SECTOR = 512
OTHER_OFFSET = 0x3300_0000_0000  # ASID 1's IOVAs: not ASID 0's
DEST_UVA_BASE = 0x5500_0000_0000  # the destination VMM maps guest RAM elsewhere
EXT = {"extension": True, "persist": True}


# ---- helpers --------------------------------------------------------------------------

@pytest.fixture
def pair(backend_factory, image, sock_dir):
    """Two back-end processes on one image, each with its control socket."""
    def start(name: str):
        control = sock_dir / f"{name}.ctl"
        backend = backend_factory("pyvhost", image, extra_args=("--control-socket", str(control)))
        return backend, control
    return start("source"), start("destination")


def check_io(driver: BlkDriver, image, *, sector: int, tag: bytes) -> None:
    payload = (tag * (64 * KiB // len(tag) + 1))[: 64 * KiB]
    driver.write(sector, payload)
    assert driver.read(sector, len(payload)) == payload
    assert image.read_bytes()[sector * SECTOR : sector * SECTOR + len(payload)] == payload
    other = sector + 256
    expected = image.read_bytes()[other * SECTOR : other * SECTOR + 12 * KiB]
    assert driver.read(other, 12 * KiB, segments=3) == expected
    assert driver.read(other, 12 * KiB, indirect=True) == expected
    assert driver.read(other, 12 * KiB, straddle=True) == expected


def iotlb_messages_received(backend) -> int:
    return len(re.findall(r"pyvhost_user\.trace: <- IOTLB_MSG(_ASID)?\b", backend.log()))


def connect_without_start(path, ram: GuestRam | None = None, **options) -> BlkDriver:
    fe = Frontend.connect(path, ram, **options)
    driver = BlkDriver(fe)
    try:
        fe.handshake(num_queues=1, config_size=BLK_CONFIG_SIZE)
    except BaseException:
        fe.close()
        raise
    return driver


def start(driver: BlkDriver) -> None:
    driver.frontend.start_device([driver.queue_size], BLK_DRIVER_FEATURES)


def source_with_two_asids(path, image) -> BlkDriver:
    """ASIDs 0 and 1 pre-mapped, the blk group bound to ASID 1, I/O done; then suspended."""
    driver = connect_without_start(path, iommu="offset", premap=True, **EXT)
    fe = driver.frontend
    try:
        start(driver)
        fe.attach_iommu(1, Iommu(driver.ram, offset=OTHER_OFFSET))
        driver.reboot(before_start=lambda: (fe.premap_iommu(1), fe.set_group_asid(0, 1)))
        check_io(driver, image, sector=0, tag=b"source")
        assert fe.iotlb_counters["miss_received"] == 0
        fe.suspend_device()
    except BaseException:
        driver.close()
        raise
    return driver


def mappings_by_gpa(spaces, ram: GuestRam | None = None):
    """{asid: [(iova, size, gpa, perm)]}: user addresses turned into gpas through ``ram``
    (the front-end that sent them), restored entries taken as they are."""
    out = {}
    for space in spaces:
        rows = []
        for m in space["mappings"]:
            if "gpa" in m:
                gpa = m["gpa"]
            else:
                region = next(r for r in ram.regions
                              if r.user_addr <= m["uaddr"] < r.user_addr + r.size)
                gpa = region.gpa + (m["uaddr"] - region.user_addr)
            rows.append((m["iova"], m["size"], gpa, m["perm"]))
        out[space["asid"]] = rows
    return out


def assert_serves_next_frontend(backend, image) -> None:
    assert backend.alive(), backend.log()[-3000:]
    with BlkDriver.connect(backend.socket_path) as driver:
        assert driver.read(8, 4 * KiB) == image.read_bytes()[8 * SECTOR : 8 * SECTOR + 4 * KiB]


# ---- the round trip ---------------------------------------------------------------------

def test_iotlb_state_moves_to_the_destination_and_io_needs_no_miss(pair, image):
    (source, source_ctl), (destination, destination_ctl) = pair
    with source_with_two_asids(source.socket_path, image) as src:
        state = src.frontend.save_device_state()
        with ControlClient(source_ctl) as control:
            source_spaces = control.execute("query-address-spaces", {"entries": True})
            assert control.execute("query-groups")[0]["asid"] == 1
        expected = mappings_by_gpa(source_spaces, src.ram)
        assert len(expected[0]) >= 1 and len(expected[1]) >= 1

        dst_ram = GuestRam(uva_base=DEST_UVA_BASE)
        dst = connect_without_start(destination.socket_path, dst_ram,
                                    iommu=Iommu(dst_ram, offset=IOVA_OFFSET), **EXT)
        with dst, dst_ram:
            fe = dst.frontend
            assert fe.has_protocol_feature(PF.DEVICE_STATE)
            # QEMU's order: the state before any memory table (that comes at device start).
            fe.load_device_state(state)
            fe.attach_iommu(1, Iommu(dst_ram, offset=OTHER_OFFSET))
            fe.adopt_address_spaces(src.frontend)
            with ControlClient(destination_ctl) as control:
                restored = control.execute("query-address-spaces", {"entries": True})
                assert control.execute("query-groups")[0]["asid"] == 1
            assert mappings_by_gpa(restored) == expected
            assert [s["state"] for s in restored] == [s["state"] for s in source_spaces]
            assert [s["default"] for s in restored] == [s["default"] for s in source_spaces]

            start(dst)
            assert dst.ring(0).desc_user_addr >= OTHER_OFFSET  # the ring's IOVAs are ASID 1's
            check_io(dst, image, sector=1024, tag=b"destination")
            assert fe.iotlb_counters["miss_received"] == 0
            assert fe.iotlb_messages_sent == 0
            fe.responder.check()
    log = destination.log()
    assert iotlb_messages_received(destination) == 0
    assert "IOTLB miss asid" not in log
    assert "device state loaded" in log and "groups bound to ASIDs [1]" in log
    assert "resolved against the memory table to come" in log
    assert "device state saved" in source.log()


def test_a_stock_frontend_moves_the_device_section_only(pair, image):
    (source, _), (destination, _) = pair
    with BlkDriver.connect(source.socket_path) as src:
        src.frontend.suspend_device()
        state = src.frontend.save_device_state()
    body = state[HEADER.size :]
    assert b'"capacity_sectors":32768' in body and b'"type":"block"' in body
    with connect_without_start(destination.socket_path) as dst:
        dst.frontend.load_device_state(state)
        start(dst)
        assert dst.read(0, 4 * KiB) == image.read_bytes()[: 4 * KiB]
    assert "device state loaded" in destination.log() and "no address spaces" in destination.log()


# ---- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", list(DeviceStateDirection), ids=lambda d: d.name.lower())
def test_a_transfer_while_a_ring_runs_is_refused(backend_factory, image, direction):
    backend = backend_factory("pyvhost", image)
    with BlkDriver.connect(backend.socket_path) as driver:
        fe = driver.frontend
        with pytest.raises(BackendRefused) as info:
            if direction == DeviceStateDirection.SAVE:
                fe.save_device_state()
            else:
                fe.load_device_state(b"")
        assert info.value.request == F.SET_DEVICE_STATE_FD
        assert info.value.code == DEVICE_STATE_REPLY_NO_FD | 1
        assert driver.read(0, 4 * KiB) == image.read_bytes()[: 4 * KiB]  # still serving
    assert "refused SET_DEVICE_STATE_FD: rings [0] are running" in backend.log()
    assert_serves_next_frontend(backend, image)


def saved_state(backend, image) -> bytes:
    with source_with_two_asids(backend.socket_path, image) as src:
        return src.frontend.save_device_state()


def reseal(stream: bytes, *, version: int | None = None) -> bytes:
    magic, old_version, size, body_size, _crc, sections = HEADER.unpack_from(stream)
    body = stream[HEADER.size :]
    return HEADER.pack(magic, version if version is not None else old_version, size, body_size,
                       zlib.crc32(body), sections) + body


CORRUPTIONS = {
    "truncated-header": (lambda s: s[:HEADER.size - 1], "truncated: 23 bytes"),
    "truncated-body": (lambda s: s[:-7], "truncated"),
    "bad-magic": (lambda s: b"NOTOURS!" + s[8:], "bad magic"),
    "newer-version": (lambda s: reseal(s, version=2), "version 2 is newer than this back-end"),
    "corrupted-checksum": (lambda s: s[:-40] + bytes([s[-40] ^ 0x10]) + s[-39:],
                           "checksum mismatch"),
    "empty": (lambda s: b"", "truncated: 0 bytes"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_damaged_stream_is_refused(pair, image, corruption):
    (source, _), (destination, destination_ctl) = pair
    damage, reason = CORRUPTIONS[corruption]
    state = damage(saved_state(source, image))
    with connect_without_start(destination.socket_path, iommu="offset", **EXT) as dst:
        with pytest.raises(BackendRefused) as info:
            dst.frontend.load_device_state(state)
        assert info.value.request == F.CHECK_DEVICE_STATE
        with ControlClient(destination_ctl) as control:
            spaces = control.execute("query-address-spaces")
            assert all(s["entries"] == 0 for s in spaces), "a refused state changed the IOTLBs"
            assert control.execute("query-groups")[0]["asid"] == 0
    assert re.search(rf"refused CHECK_DEVICE_STATE: device state load refused: .*{reason}",
                     destination.log()), destination.log()[-3000:]
    assert_serves_next_frontend(destination, image)


def test_entries_outside_the_destination_memory_are_refused(pair, image):
    (source, _), (destination, destination_ctl) = pair
    state = saved_state(source, image)  # maps all three regions, one at 4 GiB
    small = GuestRam(DEFAULT_LAYOUT[:2])
    with small, connect_without_start(destination.socket_path, small,
                                      iommu=Iommu(small, offset=IOVA_OFFSET), **EXT) as dst:
        dst.frontend.sync_memory()  # this time the table comes first: the load checks it
        with pytest.raises(BackendRefused):
            dst.frontend.load_device_state(state)
        with ControlClient(destination_ctl) as control:
            assert all(s["entries"] == 0 for s in control.execute("query-address-spaces"))
    assert re.search(r"refused CHECK_DEVICE_STATE: .*asid 0 entry iova 0x5a0100000000 .*"
                     r"outside this back-end's memory table", destination.log())
    assert_serves_next_frontend(destination, image)


def test_address_spaces_for_a_frontend_without_the_extension_are_refused(pair, image):
    (source, _), (destination, _) = pair
    state = saved_state(source, image)
    with connect_without_start(destination.socket_path) as dst:
        with pytest.raises(BackendRefused):
            dst.frontend.load_device_state(state)
    assert "did not negotiate the address-space extension" in destination.log()
    assert_serves_next_frontend(destination, image)


def test_a_state_of_another_disk_is_refused(backend_factory, image, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(8 << 20))
    source = backend_factory("pyvhost", other)
    destination = backend_factory("pyvhost", image)
    with BlkDriver.connect(source.socket_path) as src:
        src.frontend.suspend_device()
        state = src.frontend.save_device_state()
    with connect_without_start(destination.socket_path) as dst:
        with pytest.raises(BackendRefused):
            dst.frontend.load_device_state(state)
    assert "capacity_sectors: 16384 on the source, 32768 here" in destination.log()
    assert_serves_next_frontend(destination, image)


@pytest.mark.parametrize(("direction", "phase", "reason"), [
    pytest.param(0, 1, "device state phase 1 is unknown", id="phase-1"),
    pytest.param(1, 0xFFFFFFFF, "device state phase 4294967295 is unknown", id="phase-max"),
    pytest.param(2, 0, "device state direction 2 is unknown", id="direction-2"),
])
def test_an_unknown_phase_or_direction_is_refused(backend_factory, image, direction, phase,
                                                  reason):
    backend = backend_factory("pyvhost", image)
    with connect_without_start(backend.socket_path) as driver:
        fe = driver.frontend
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with fe.exchange():
                fe.send_raw(struct.pack("<IIIII", F.SET_DEVICE_STATE_FD, 1, 8, direction, phase),
                            [w])
                answer = fe.receive_reply(F.SET_DEVICE_STATE_FD)
            # Due without NEED_REPLY (DEVICE_STATE is negotiated): an error and no fd.
            assert answer.payload == U64(DEVICE_STATE_REPLY_NO_FD | 1) and not answer.fds
            os.close(w)
            w = -1
            # The back-end kept nothing of it: its copy of the fd is closed.
            assert os.read(r, 1) == b""
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert fe.check_device_state() != 0  # nothing to check
    log = backend.log()
    assert f"malformed message refused: SET_DEVICE_STATE_FD: {reason}" in log
    assert "refused CHECK_DEVICE_STATE: no device state transfer to check" in log
    assert_serves_next_frontend(backend, image)


def test_check_before_the_frontend_closed_its_end_fails_without_waiting(backend_factory, image):
    backend = backend_factory("pyvhost", image)
    with connect_without_start(backend.socket_path) as driver:
        fe = driver.frontend
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            assert fe.set_device_state_fd(DeviceStateDirection.LOAD, r) is None
            os.write(w, b"PVUDEVST")
            assert fe.check_device_state() != 0  # w is still open: no end of file
        finally:
            os.close(r)
            os.close(w)
    assert "did not close its end before CHECK_DEVICE_STATE" in backend.log()
    assert_serves_next_frontend(backend, image)


def test_check_before_the_frontend_read_the_save_fails(backend_factory, image):
    backend = backend_factory("pyvhost", image)
    with connect_without_start(backend.socket_path) as driver:
        fe = driver.frontend
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(r)  # nobody will read: the back-end's write fails
        try:
            assert fe.set_device_state_fd(DeviceStateDirection.SAVE, w) is None
        finally:
            os.close(w)
        assert fe.check_device_state() != 0
    assert re.search(r"refused CHECK_DEVICE_STATE: device state save failed: .*"
                     r"the front-end closed its end", backend.log())
    assert_serves_next_frontend(backend, image)
