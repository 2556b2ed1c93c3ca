"""The wire codec: round trips, stream reassembly, fds, and every refusal."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost_user import wire
from pyvhost_user.wire import (
    BACKEND_LAYOUTS,
    FRONTEND_LAYOUTS,
    NEED_DATA,
    BackendRequest,
    FrontendRequest as R,
    MessageReader,
    encode_message,
)
from pyvhost_user.wire.messages import (
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    MemRegion,
    MemTable,
    SingleMemRegion,
    U64,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def regions(draw: st.DrawFn) -> MemRegion:
    size = draw(st.integers(1, 2**40))
    limit = 2**64 - size
    return MemRegion(
        draw(st.integers(0, limit)), size, draw(st.integers(0, limit)), draw(st.integers(0, limit))
    )


PAYLOADS: dict[type, st.SearchStrategy] = {
    Empty: st.just(Empty()),
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, st.sampled_from([0, 1]), u64, u64, u64, u64),
    VringFile: st.builds(VringFile, st.integers(0, 255), st.booleans()),
    MemTable: st.lists(regions(), min_size=1, max_size=8).map(lambda r: MemTable(tuple(r))),
    SingleMemRegion: st.builds(SingleMemRegion, regions()),
    LogDescription: st.builds(LogDescription, u64, u64),
    IotlbMsg: st.builds(
        IotlbMsg,
        u64,
        u64,
        u64,
        st.sampled_from(list(wire.IotlbPerm)),
        st.sampled_from([wire.IotlbType.MISS, wire.IotlbType.UPDATE, wire.IotlbType.ACCESS_FAIL]),
    ),
    ConfigSpace: st.integers(0, 256).flatmap(
        lambda size: st.builds(
            ConfigSpace,
            st.integers(0, 256 - size),
            st.just(size),
            st.sampled_from([0, 1]),
            st.binary(min_size=size, max_size=size),
        )
    ),
    InflightDescription: st.builds(
        InflightDescription, u64, u64, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)
    ),
    VringArea: st.builds(VringArea, u64, u64, u64),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, st.sampled_from([0, 1]), st.just(0)),
}
PAYLOADS[wire.AsidIotlbMsg] = st.builds(wire.AsidIotlbMsg, u32, PAYLOADS[IotlbMsg])


def fds_for(layout: wire.Layout, payload: object, reply: bool) -> list[int]:
    rule = layout.reply_fds if reply else layout.request_fds
    low, _high = rule(payload)
    return [os.eventfd(0) for _ in range(low)]


@st.composite
def frontend_requests(draw: st.DrawFn) -> tuple[int, object]:
    code = draw(st.sampled_from(sorted(FRONTEND_LAYOUTS)))
    return code, draw(PAYLOADS[FRONTEND_LAYOUTS[code].request])


def feed(reader: MessageReader, data: bytes, fds: list[int], *, step: int | None) -> None:
    if step is None:
        reader.receive(data, fds)
        return
    reader.receive(data[:step], fds)
    for i in range(step, len(data), step):
        reader.receive(data[i : i + step])


@settings(max_examples=300, deadline=None)
@given(frontend_requests(), st.booleans(), st.sampled_from([None, 1, 5, 12]))
def test_every_request_round_trips_whole_and_in_pieces(req, need_reply, step):
    code, payload = req
    layout = FRONTEND_LAYOUTS[code]
    fds = fds_for(layout, payload, reply=False)
    message = wire.request(code, payload, fds=fds, need_reply=need_reply)
    data, sent_fds = encode_message(message)
    reader = MessageReader()
    feed(reader, data, list(sent_fds), step=step)
    got = reader.next_message()
    try:
        assert got.request == code
        assert got.payload == payload
        assert got.need_reply == need_reply
        assert got.fds == tuple(fds)
        assert reader.next_message() is NEED_DATA
    finally:
        wire.close_all(fds)


@settings(max_examples=100, deadline=None)
@given(frontend_requests())
def test_replies_round_trip(req):
    code, _ = req
    layout = FRONTEND_LAYOUTS[code]
    reply_type = layout.reply or U64
    payload = {
        U64: U64(0),
        VringState: VringState(0, 7),
        ConfigSpace: ConfigSpace(0, 4, 0, b"abcd"),
        InflightDescription: InflightDescription(4096, 0, 1, 128),
    }[reply_type]
    fds = fds_for(layout, payload, reply=True)
    data, _ = encode_message(wire.reply(code, payload, fds=fds))
    assert struct.unpack_from("<I", data, 4)[0] == 0x5  # QEMU accepts exactly 0x5
    reader = MessageReader(expect_replies=True)
    reader.receive(data, fds)
    got = reader.next_message()
    assert got.is_reply and got.payload == payload and got.fds == tuple(fds)
    wire.close_all(fds)


def test_backend_channel_requests_round_trip():
    msg = wire.request(
        BackendRequest.IOTLB_MSG,
        IotlbMsg(0x1000, 0, 0, wire.IotlbPerm.RW, wire.IotlbType.MISS),
        need_reply=True,
        backend_channel=True,
    )
    data, _ = encode_message(msg)
    reader = MessageReader(BACKEND_LAYOUTS)
    reader.receive(data)
    got = reader.next_message()
    assert got.payload == msg.payload and got.backend_channel
    assert str(got).startswith("BACKEND_IOTLB_MSG")


def test_messages_back_to_back_with_trailing_bytes():
    reader = MessageReader()
    a, _ = encode_message(wire.request(R.GET_FEATURES))
    b, _ = encode_message(wire.request(R.SET_VRING_NUM, VringState(0, 256)))
    reader.receive(a + b + b[:5])
    assert reader.next_message().request == R.GET_FEATURES
    assert reader.next_message().payload == VringState(0, 256)
    assert reader.next_message() is NEED_DATA
    assert reader.bytes_needed() == 12 - 5


def test_golden_bytes_of_qemu_get_features():
    # As QEMU sends it: request 1, flags 0x1, size 0.
    reader = MessageReader()
    reader.receive(bytes.fromhex("01000000 01000000 00000000"))
    assert reader.next_message().request == R.GET_FEATURES


def test_invalidate_ignores_qemu_garbage_in_uaddr_and_perm():
    raw = struct.pack("<QQQBB6x", 0x1000, 0x2000, 0xDEADBEEF, 0xFF, 3)
    data = struct.pack("<III", R.IOTLB_MSG, 1, len(raw)) + raw
    reader = MessageReader()
    reader.receive(data)
    msg = reader.next_message()
    assert msg.payload.type == wire.IotlbType.INVALIDATE and msg.payload.uaddr == 0


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<III", 1, 0x0, 0),  # version 0
        struct.pack("<III", 1, 0x2, 0),  # version 2
        struct.pack("<III", 1, 0x11, 0),  # unknown flag bit
        struct.pack("<III", 1, 0x1, 1 << 20),  # absurd size
    ],
)
def test_broken_framing_is_fatal_and_sticky(header):
    reader = MessageReader()
    fd = os.eventfd(0)
    reader.receive(header, [fd])
    with pytest.raises(wire.FramingError):
        reader.next_message()
    assert not fd_is_open(fd)  # fds of a broken stream are closed, not leaked
    with pytest.raises(wire.FramingError):
        reader.receive(b"more")


def raw_message(code: int, payload: bytes, flags: int = 1) -> bytes:
    return struct.pack("<III", code, flags, len(payload)) + payload


@pytest.mark.parametrize(
    ("data", "nfds", "error"),
    [
        (raw_message(99, b""), 0, wire.UnknownRequest),
        (raw_message(R.SET_FEATURES, b"\0" * 4), 0, wire.BadPayloadSize),
        (raw_message(R.GET_FEATURES, b"\0" * 8), 0, wire.BadPayloadSize),
        (raw_message(R.SET_VRING_ADDR, b"\0" * 39), 0, wire.BadPayloadSize),
        (raw_message(R.SET_MEM_TABLE, struct.pack("<II", 9, 0) + b"\0" * 288), 0, wire.InvalidField),
        (raw_message(R.SET_MEM_TABLE, struct.pack("<II", 0, 0)), 0, wire.InvalidField),
        (
            raw_message(R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 4096, 0, 0)),
            0,
            wire.MissingFds,
        ),
        (
            raw_message(R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0, 0, 0)),
            1,
            wire.InvalidField,  # a region of size 0
        ),
        (
            raw_message(
                R.ADD_MEM_REG, bytes(8) + struct.pack("<QQQQ", 2**64 - 4096, 8192, 0, 0)
            ),
            1,
            wire.InvalidField,  # wraps past 2**64
        ),
        (raw_message(R.SET_VRING_KICK, struct.pack("<Q", 0)), 0, wire.MissingFds),
        (raw_message(R.SET_VRING_KICK, struct.pack("<Q", 0x100)), 1, wire.UnexpectedFds),
        (raw_message(R.SET_VRING_KICK, struct.pack("<Q", 0x200)), 1, wire.InvalidField),
        (raw_message(R.GET_FEATURES, b""), 1, wire.UnexpectedFds),
        (raw_message(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 2, 0, 0, 0, 0)), 0, wire.InvalidField),
        (raw_message(R.GET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(300)), 0, wire.InvalidField),
        (raw_message(R.GET_CONFIG, struct.pack("<III", 0, 10, 0) + bytes(4)), 0, wire.BadPayloadSize),
        (raw_message(R.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 1, 0, 3, 9)), 0, wire.InvalidField),
        (raw_message(R.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 1, 0, 7, 2)), 0, wire.InvalidField),
        (raw_message(R.GET_FEATURES, b"", flags=0x5), 0, wire.BadFlags),  # a reply as request
    ],
)
def test_malformed_message_is_refused_and_stream_stays_in_sync(data, nfds, error):
    reader = MessageReader()
    fds = [os.eventfd(0) for _ in range(nfds)]
    follow, _ = encode_message(wire.request(R.GET_QUEUE_NUM))
    reader.receive(data, fds)
    reader.receive(follow)
    with pytest.raises(error) as info:
        reader.next_message()
    assert info.value.request == struct.unpack_from("<I", data)[0]
    assert all(not fd_is_open(fd) for fd in fds)
    assert reader.next_message().request == R.GET_QUEUE_NUM


def test_more_than_eight_fds_is_fatal():
    reader = MessageReader()
    fds = [os.eventfd(0) for _ in range(9)]
    reader.receive(raw_message(R.GET_FEATURES, b""), fds)
    with pytest.raises(wire.FramingError):
        reader.next_message()
    assert all(not fd_is_open(fd) for fd in fds)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_exceptions(data):
    reader = MessageReader()
    reader.receive(data)
    for _ in range(50):
        try:
            if reader.next_message() is NEED_DATA:
                break
        except wire.FramingError:
            break
        except wire.MalformedMessage:
            continue
