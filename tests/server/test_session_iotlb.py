"""The session's IOTLB handling alone: gates, the reset policy table, batches, disconnect."""

from __future__ import annotations

import os

import pytest

from pyvhost_user import wire
from pyvhost_user.devices.blk import BlkDevice
from pyvhost_user.frontend.guest_ram import GuestRam
from pyvhost_user.memory.iotlb import DefaultMapping
from pyvhost_user.server import Disconnect, Session
from pyvhost_user.server.options import BackendOptions, IotlbPersist
from pyvhost_user.server.session import PROTOCOL_FEATURES, TRANSPORT_FEATURES
from pyvhost_user.wire import (
    U64,
    AsidIotlbMsg,
    FrontendRequest as R,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    SingleMemRegion,
    VendorProtocolFeature as VPF,
    VendorRequest as VR,
    VirtioFeature as VF,
    VringState,
)

RW = IotlbPerm.RW
STOCK = PROTOCOL_FEATURES & ~(VPF.ADDRESS_SPACES | VPF.IOTLB_PERSIST)


@pytest.fixture
def ram():
    with GuestRam() as ram:
        yield ram


@pytest.fixture
def device(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    dev = BlkDevice(str(image))
    yield dev
    dev.close()


def send(session, code, payload=None, *, fds=(), need_reply=True):
    return session.handle(wire.request(code, payload, fds=fds, need_reply=need_reply))


def ok(replies) -> bool:
    (only,) = replies
    return only.payload == U64(0)


def make_session(device, ram, *, protocol=PROTOCOL_FEATURES, access_platform=True, **options):
    session = Session(device, options=BackendOptions(**options))
    send(session, R.SET_PROTOCOL_FEATURES, U64(protocol))
    send(session, R.SET_OWNER)
    features = TRANSPORT_FEATURES & ~VF.RING_PACKED  # split rings
    if not access_platform:
        features &= ~VF.ACCESS_PLATFORM
    send(session, R.SET_FEATURES, U64(features))
    for region in ram.regions:
        assert ok(send(session, R.ADD_MEM_REG, SingleMemRegion(region.mem_region()),
                       fds=[os.dup(region.fd)]))
    return session


def update(iova, size, uaddr, perm=RW) -> IotlbMsg:
    return IotlbMsg(iova, size, uaddr, perm, IotlbType.UPDATE)


def test_stock_front_end_gets_empty_asids_and_plain_iotlb_messages_hit_asid0(device, ram):
    session = make_session(device, ram, protocol=STOCK)
    assert all(t.default is DefaultMapping.EMPTY for t in session.asids.iotlbs)
    uva = ram.regions[0].user_addr
    assert ok(send(session, R.IOTLB_MSG, update(0x10000, 0x1000, uva)))
    assert len(session.asids.iotlb(0)) == 1 and len(session.asids.iotlb(1)) == 0
    # the same update again (two misses on one page): accepted, nothing changes
    assert ok(send(session, R.IOTLB_MSG, update(0x10000, 0x1000, uva)))
    assert len(session.asids.iotlb(0)) == 1
    # an overlapping, different one: refused
    assert not ok(send(session, R.IOTLB_MSG, update(0x10800, 0x1000, uva)))


def test_extension_front_end_gets_the_configured_default(device, ram):
    session = make_session(device, ram, asid_default=DefaultMapping.IDENTITY)
    assert all(t.default is DefaultMapping.IDENTITY and t.passthrough for t in session.asids.iotlbs)


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (VR.SET_GROUP_ASID, VringState(0, 1)),
        (VR.RESET_MAP, U64(0)),
        (VR.IOTLB_BATCH_BEGIN, None),
        (VR.IOTLB_MSG_ASID, AsidIotlbMsg(1, update(0, 0x1000, 0))),
    ],
)
def test_extension_requests_are_refused_to_a_stock_front_end(device, ram, code, payload):
    session = make_session(device, ram, protocol=STOCK)
    assert not ok(send(session, code, payload))


def test_extension_query_refused_to_stock_front_end_closes_rather_than_lies(device, ram):
    session = make_session(device, ram, protocol=STOCK)
    with pytest.raises(Disconnect):
        send(session, VR.GET_NUM_ASIDS)


def test_iotlb_message_needs_access_platform(device, ram):
    session = make_session(device, ram, access_platform=False)
    assert not ok(send(session, R.IOTLB_MSG, update(0, 0x1000, ram.regions[0].user_addr)))


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (AsidIotlbMsg(7, update(0, 0x1000, 0x7F00_0000_0000)), "unknown asid"),
        (AsidIotlbMsg(0, update(0, 0, 0x7F00_0000_0000)), "zero size"),
        (AsidIotlbMsg(0, update(2**64 - 0x1000, 0x2000, 0x7F00_0000_0000)), "wraps"),
        (AsidIotlbMsg(0, update(0, 0x1000, 0x1234_0000)), "outside the memory table"),
        (AsidIotlbMsg(0, IotlbMsg(0, 0x1000, 0, RW, IotlbType.MISS)), "a MISS is not for a back-end"),
        (AsidIotlbMsg(0, IotlbMsg(0, 0x1000, 0x7F00_0000_0000, IotlbPerm.NONE, IotlbType.UPDATE)),
         "no permission"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_iotlb_messages_are_refused(device, ram, msg, reason):
    session = make_session(device, ram)
    assert not ok(send(session, VR.IOTLB_MSG_ASID, msg)), reason
    assert all(len(t) == 0 for t in session.asids.iotlbs)


def test_update_before_any_memory_table_is_refused(device):
    session = Session(device)
    send(session, R.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES))
    send(session, R.SET_OWNER)
    send(session, R.SET_FEATURES, U64(TRANSPORT_FEATURES & ~VF.RING_PACKED))
    assert not ok(send(session, R.IOTLB_MSG, update(0, 0x1000, 0x7F00_0000_0000)))


def test_groups_and_binding(device, ram):
    session = make_session(device, ram)
    assert send(session, VR.GET_NUM_ASIDS)[0].payload == U64(2)
    assert send(session, VR.GET_VRING_GROUP, VringState(0, 0))[0].payload == VringState(0, 0)
    assert ok(send(session, VR.SET_GROUP_ASID, VringState(0, 1)))
    assert session.asids.group_asid == [1]
    assert not ok(send(session, VR.SET_GROUP_ASID, VringState(1, 0)))  # no group 1
    assert not ok(send(session, VR.SET_GROUP_ASID, VringState(0, 2)))  # no ASID 2
    send(session, R.SET_STATUS, U64(0))
    assert session.asids.group_asid == [0]  # device reset: every group back on ASID 0


@pytest.mark.parametrize(
    ("policy", "front_end_asks", "kept"),
    [
        (IotlbPersist.NEGOTIATED, True, True),
        (IotlbPersist.NEGOTIATED, False, False),
        (IotlbPersist.ALWAYS, False, True),
        (IotlbPersist.NEVER, True, False),
    ],
)
@pytest.mark.parametrize("reset", ["SET_STATUS 0", "RESET_DEVICE", "RESET_OWNER"])
def test_reset_policy_table(device, ram, policy, front_end_asks, kept, reset):
    protocol = PROTOCOL_FEATURES if front_end_asks else PROTOCOL_FEATURES & ~VPF.IOTLB_PERSIST
    session = make_session(device, ram, protocol=protocol, iotlb_persist=policy)
    uva = ram.regions[0].user_addr
    for asid in (0, 1):
        assert ok(send(session, VR.IOTLB_MSG_ASID, AsidIotlbMsg(asid, update(0x10000, 0x1000, uva))))
    {
        "SET_STATUS 0": lambda: send(session, R.SET_STATUS, U64(0)),
        "RESET_DEVICE": lambda: send(session, R.RESET_DEVICE),
        "RESET_OWNER": lambda: send(session, R.RESET_OWNER),
    }[reset]()
    assert [len(t) for t in session.asids.iotlbs] == ([1, 1] if kept else [0, 0])
    assert all(t.is_default for t in session.asids.iotlbs) == (not kept)


def test_reset_map_touches_one_asid_only(device, ram):
    session = make_session(device, ram)
    uva = ram.regions[0].user_addr
    for asid in (0, 1):
        send(session, VR.IOTLB_MSG_ASID, AsidIotlbMsg(asid, update(0x10000, 0x1000, uva)))
    assert ok(send(session, VR.RESET_MAP, U64(0)))
    assert session.asids.iotlb(0).is_default and len(session.asids.iotlb(1)) == 1
    assert not ok(send(session, VR.RESET_MAP, U64(5)))


def test_batch_is_applied_at_end_and_reports_refusals(device, ram):
    session = make_session(device, ram)
    uva = ram.regions[0].user_addr
    assert not ok(send(session, VR.IOTLB_BATCH_END))  # nothing open
    assert ok(send(session, VR.IOTLB_BATCH_BEGIN))
    assert not ok(send(session, VR.IOTLB_BATCH_BEGIN))  # already open
    for i in range(3):
        assert ok(send(session, VR.IOTLB_MSG_ASID, AsidIotlbMsg(1, update(i * 0x1000, 0x1000, uva))))
    send(session, VR.IOTLB_MSG_ASID, AsidIotlbMsg(1, update(0x800, 0x1000, uva)))  # overlaps
    assert len(session.asids.iotlb(1)) == 0  # nothing applied before END
    assert not ok(send(session, VR.IOTLB_BATCH_END))
    assert len(session.asids.iotlb(1)) == 3


def test_disconnect_resets_only_the_asids_the_front_end_touched(device, ram):
    session = make_session(device, ram, asid_default=DefaultMapping.EMPTY)
    uva = ram.regions[0].user_addr
    send(session, VR.IOTLB_MSG_ASID, AsidIotlbMsg(1, update(0x10000, 0x1000, uva)))
    touched = []
    session._emit = lambda name, data: touched.append((name, data))
    session.close()
    assert ("RESET_MAP", {"asids": [1], "cause": "front-end disconnected"}) in touched
