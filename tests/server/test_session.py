"""The session (dispatcher) alone: no socket, messages in, replies out."""

from __future__ import annotations

import os

import pytest

from pyvhost_user import wire
from pyvhost_user.devices.blk import BlkDevice
from pyvhost_user.frontend.guest_ram import GuestRam
from pyvhost_user.frontend.split_ring import SplitRing
from pyvhost_user.server import Disconnect, Session
from pyvhost_user.server.session import PROTOCOL_FEATURES
from pyvhost_user.wire import (
    U64,
    ConfigSpace,
    FrontendRequest as R,
    ProtocolFeature as PF,
    SingleMemRegion,
    VirtioFeature as VF,
    VringAddr,
    VringFile,
    VringState,
)


@pytest.fixture
def device(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    dev = BlkDevice(str(image), num_queues=2)
    yield dev
    dev.close()


@pytest.fixture
def session(device):
    s = Session(device)
    yield s
    s.close()


def send(session: Session, code: int, payload=None, *, fds=(), need_reply=False):
    return session.handle(wire.request(code, payload, fds=fds, need_reply=need_reply))


def acked(replies) -> bool:
    (only,) = replies
    assert only.flags == 0x5
    return only.payload == U64(0)


def negotiate(session: Session) -> None:
    features = send(session, R.GET_FEATURES)[0].payload.value
    send(session, R.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES))
    send(session, R.SET_OWNER)
    send(session, R.SET_FEATURES, U64(features & ~VF.EVENT_IDX & ~VF.RING_PACKED))  # split rings


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_offers_what_qemu_needs_and_nothing_it_must_not_get(session):
    protocol = send(session, R.GET_PROTOCOL_FEATURES)[0].payload.value
    assert protocol & PF.CONFIG and protocol & PF.MQ and protocol & PF.REPLY_ACK
    assert not protocol & (PF.INBAND_NOTIFICATIONS | PF.XEN_MMAP)
    features = send(session, R.GET_FEATURES)[0].payload.value
    assert features & VF.VERSION_1 and features & VF.VHOST_USER_F_PROTOCOL_FEATURES


def test_features_not_offered_are_refused_with_a_nack(session):
    send(session, R.SET_OWNER)
    assert not acked(send(session, R.SET_FEATURES, U64(1 << 63), need_reply=True))
    assert session.acked_features == 0
    assert not acked(
        send(session, R.SET_PROTOCOL_FEATURES, U64(PF.INBAND_NOTIFICATIONS), need_reply=True)
    )


def test_request_needing_an_unnegotiated_protocol_feature(session):
    assert not acked(send(session, R.RESET_DEVICE, need_reply=True))
    # A refused request whose answer is a value: the connection is dropped, not lied to.
    with pytest.raises(Disconnect):
        send(session, R.GET_QUEUE_NUM)


def test_refused_get_config_answers_with_an_empty_payload(session):
    (reply,) = send(session, R.GET_CONFIG, ConfigSpace(0, 60, 0, bytes(60)))
    assert reply.payload.size == 0  # CONFIG not negotiated
    negotiate(session)
    (reply,) = send(session, R.GET_CONFIG, ConfigSpace(0, 60, 0, bytes(60)))
    assert reply.payload.size == 60
    assert not acked(send(session, R.SET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)), need_reply=True))


def test_vring_requests_before_set_owner_are_refused(session):
    assert not acked(send(session, R.SET_VRING_NUM, VringState(0, 128), need_reply=True))


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (R.SET_VRING_NUM, VringState(2, 128)),  # index past the 2 rings
        (R.SET_VRING_NUM, VringState(0, 100)),  # not a power of 2
        (R.SET_VRING_NUM, VringState(0, 4096)),  # above our maximum
        (R.SET_VRING_BASE, VringState(0, 70000)),  # split ring base is a u16
        (R.SET_VRING_ENABLE, VringState(0, 2)),
        (R.SET_VRING_ADDR, VringAddr(5, 0, 0, 0, 0, 0)),
    ],
)
def test_ring_requests_out_of_range_are_refused(session, code, payload):
    negotiate(session)
    assert not acked(send(session, code, payload, need_reply=True))


def test_kick_without_fd_is_refused_and_bad_memory_fd_is_closed(session):
    negotiate(session)
    assert not acked(send(session, R.SET_VRING_KICK, VringFile(0, True), need_reply=True))
    r, w = os.pipe()
    region = wire.MemRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
    assert not acked(send(session, R.ADD_MEM_REG, SingleMemRegion(region), fds=[r], need_reply=True))
    assert not fd_is_open(r)  # refused, and not leaked
    os.close(w)
    assert len(session.memory) == 0


def test_memory_table_survives_device_reset_and_ring_base_survives_status_0(session):
    negotiate(session)
    with GuestRam() as ram:
        for region in ram.regions:
            fd = os.dup(region.fd)
            assert acked(send(session, R.ADD_MEM_REG, SingleMemRegion(region.mem_region()),
                              fds=[fd], need_reply=True))
            assert not fd_is_open(fd)  # mapped, then closed: the mapping keeps the memory
        ring = SplitRing(ram, 8)
        send(session, R.SET_VRING_NUM, VringState(0, 8))
        send(session, R.SET_VRING_BASE, VringState(0, 5))
        send(session, R.SET_VRING_ADDR,
             VringAddr(0, 0, ring.desc_user_addr, ring.used_user_addr, ring.avail_user_addr, 0))
        kick = os.eventfd(0)
        assert acked(send(session, R.SET_VRING_KICK, VringFile(0, False), fds=[kick],
                          need_reply=True))
        assert session.rings[0].started
        send(session, R.SET_STATUS, U64(0))
        assert not session.rings[0].started
        assert len(session.memory) == len(ram.regions)
        (base,) = send(session, R.GET_VRING_BASE, VringState(0, 0))
        assert base.payload == VringState(0, 5)
        send(session, R.RESET_DEVICE)
        assert len(session.memory) == len(ram.regions)
        assert session.rings[0].config.base == 0
        ring.release()


def test_set_owner_again_starts_the_session_over_keeping_what_came_before_it(session):
    """QEMU 7.2 re-initialises the device on the same connection after device_del /
    device_add with the chardev kept: SET_OWNER again, then the same memory regions
    again. They must be taken, not refused as overlaps of the old table."""
    ram = GuestRam()
    try:
        negotiate(session)  # SET_PROTOCOL_FEATURES (REPLY_ACK, slots), SET_OWNER
        region = ram.regions[0]
        payload = SingleMemRegion(region.mem_region())
        assert acked(send(session, R.ADD_MEM_REG, payload, fds=[os.dup(region.fd)],
                          need_reply=True))
        # The same memory again (QEMU's vhost-user-net sends it once per queue
        # pair): taken, and counted, not mapped twice.
        assert acked(send(session, R.ADD_MEM_REG, payload, fds=[os.dup(region.fd)],
                          need_reply=True))
        assert len(session.memory) == 1
        send(session, R.SET_OWNER)
        assert len(session.memory) == 0 and session.acked_protocol_features == PROTOCOL_FEATURES
        assert acked(send(session, R.ADD_MEM_REG, payload, fds=[os.dup(region.fd)],
                          need_reply=True))
        assert len(session.memory) == 1
    finally:
        session.close()
        ram.close()


def test_the_same_region_added_per_queue_pair_stays_until_each_adder_removed_it(session):
    """QEMU 7.2 and 10.0 vhost-user-net (traced, 2 queue pairs): each pair's vhost_dev
    sends ADD_MEM_REG for the same region on the one connection. Refusing the second
    failed the device start; each REM_MEM_REG takes back one of them."""
    ram = GuestRam()
    other = GuestRam()
    try:
        negotiate(session)
        region = ram.regions[0]
        payload = SingleMemRegion(region.mem_region())
        for _ in range(2):
            assert acked(send(session, R.ADD_MEM_REG, payload, fds=[os.dup(region.fd)],
                              need_reply=True))
        assert len(session.memory) == 1
        # Same addresses, other memory (another memfd): an overlap, refused.
        assert not acked(send(session, R.ADD_MEM_REG, payload, fds=[os.dup(other.regions[0].fd)],
                              need_reply=True))
        assert acked(send(session, R.REM_MEM_REG, payload, fds=[os.dup(region.fd)],
                          need_reply=True))
        assert len(session.memory) == 1
        assert acked(send(session, R.REM_MEM_REG, payload, fds=[os.dup(region.fd)],
                          need_reply=True))
        assert len(session.memory) == 0
    finally:
        session.close()
        ram.close()
        other.close()
