"""The device state stream (server/device_state.py): round trips, and every fault refused.

A stream comes from another process through the front-end, maybe from another
version, maybe damaged: decode must either return exactly what was encoded or
raise ``DeviceStateError``, never anything else and never a partial state.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost_user.memory.iotlb import DefaultMapping, IotlbEntry
from pyvhost_user.memory.iotlb_state import AddressSpacesState, IotlbState
from pyvhost_user.server.device_state import (
    ENTRY,
    HEADER,
    MAGIC,
    SECTION,
    SECTION_OPTIONAL,
    DeviceState,
    DeviceStateError,
    SectionType,
    decode,
    encode,
)

U64 = (1 << 64) - 1
BLK = {"type": "block", "capacity_sectors": 32768, "read_only": False, "num_queues": 1}


@st.composite
def iotlb_states(draw, asid: int) -> IotlbState:
    default = draw(st.sampled_from(list(DefaultMapping)))
    if draw(st.booleans()):
        return IotlbState(asid, default, draw(st.booleans()))
    entries = []
    cursor = draw(st.integers(0, 1 << 48))
    for _ in range(draw(st.integers(0, 12))):
        iova = cursor + draw(st.integers(0, 1 << 32))
        size = draw(st.integers(1, 1 << 40))
        if iova + size - 1 > U64:
            break
        target = draw(st.integers(0, U64 - size + 1))
        entries.append(IotlbEntry(iova, size, target, draw(st.sampled_from([1, 2, 3])), "gpa"))
        cursor = iova + size
    return IotlbState(asid, default, False, tuple(entries))


@st.composite
def address_spaces(draw) -> AddressSpacesState:
    count = draw(st.integers(1, 5))
    groups = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=4))
    return AddressSpacesState(tuple(groups), tuple(draw(iotlb_states(a)) for a in range(count)))


json_scalars = st.none() | st.booleans() | st.integers(-(1 << 63), 1 << 64) | st.text(max_size=20)
device_states = st.dictionaries(
    st.text(max_size=12),
    st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
    max_size=6,
)
states = st.builds(DeviceState, device_states, st.none() | address_spaces())


def valid_stream() -> bytes:
    spaces = AddressSpacesState((1,), (
        IotlbState(0, DefaultMapping.IDENTITY, True),
        IotlbState(1, DefaultMapping.EMPTY, False, (
            IotlbEntry(0x1000, 0x2000, 0x40000, 3, "gpa"),
            IotlbEntry(0x5000, 0x1000, 0x100000000, 1, "gpa"),
        )),
    ))
    return encode(DeviceState(BLK, spaces))


def reseal(body: bytes, *, version: int = 1, sections: int | None = None,
           magic: bytes = MAGIC) -> bytes:
    """A stream around ``body`` with a correct length and checksum: only what a test
    changes is wrong."""
    count = sections if sections is not None else _count_sections(body)
    return HEADER.pack(magic, version, HEADER.size, len(body), zlib.crc32(body), count) + body


def _count_sections(body: bytes) -> int:
    offset = count = 0
    while offset < len(body):
        offset += SECTION.size + SECTION.unpack_from(body, offset)[2]
        count += 1
    return count


def section(kind: int, payload: bytes, flags: int = 0) -> bytes:
    return SECTION.pack(kind, flags, len(payload)) + payload


DEVICE = section(SectionType.DEVICE, json.dumps(BLK).encode())


# -- round trips -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(states)
def test_decode_returns_what_was_encoded(state):
    assert decode(encode(state)) == state


def test_a_blk_state_without_address_spaces():
    state = DeviceState(BLK)
    data = encode(state)
    assert data[:8] == MAGIC and decode(data) == state


def test_an_optional_section_of_a_later_version_is_skipped():
    body = DEVICE + section(99, b"future", SECTION_OPTIONAL)
    assert decode(reseal(body)) == DeviceState(BLK)


# -- damaged streams -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_truncation_is_refused(data):
    stream = valid_stream()
    cut = data.draw(st.integers(0, len(stream) - 1))
    with pytest.raises(DeviceStateError, match="truncated"):
        decode(stream[:cut])


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_every_changed_byte_is_refused(data):
    stream = bytearray(valid_stream())
    index = data.draw(st.integers(0, len(stream) - 1))
    stream[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(DeviceStateError):
        decode(bytes(stream))


def test_trailing_bytes_are_refused():
    with pytest.raises(DeviceStateError, match="2 bytes after the end"):
        decode(valid_stream() + b"\0\0")


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        pytest.param(lambda: b"QEMUVMST" + valid_stream()[8:], "bad magic", id="magic"),
        pytest.param(lambda: reseal(DEVICE, version=2), "version 2 is newer", id="newer-version"),
        pytest.param(lambda: reseal(DEVICE, version=0), "version 0 is unknown", id="version-0"),
        pytest.param(lambda: valid_stream()[:-1] + bytes([valid_stream()[-1] ^ 1]),
                     "checksum mismatch", id="checksum"),
        pytest.param(lambda: reseal(DEVICE, sections=2), "section 1 of 2 starts past",
                     id="section-count-high"),
        pytest.param(lambda: reseal(DEVICE + DEVICE, sections=1), "after the last of 1",
                     id="section-count-low"),
        pytest.param(lambda: reseal(b""), "no DEVICE section", id="no-device"),
        pytest.param(lambda: reseal(DEVICE + DEVICE), "DEVICE appears twice", id="duplicate"),
        pytest.param(lambda: reseal(DEVICE + section(99, b"x")), "type 99 is unknown",
                     id="unknown-required-section"),
        pytest.param(lambda: reseal(DEVICE + section(99, b"x", 0x2)), "unknown flags",
                     id="unknown-section-flags"),
        pytest.param(lambda: reseal(section(SectionType.DEVICE, b"[1]")), "not an object",
                     id="device-not-object"),
        pytest.param(lambda: reseal(section(SectionType.DEVICE, b'{"a":1,"a":2}')),
                     "appears twice", id="device-duplicate-key"),
        pytest.param(lambda: reseal(section(SectionType.DEVICE, b'{"a":NaN}')),
                     "NaN is not a JSON value", id="device-nan"),
        pytest.param(lambda: reseal(section(SectionType.DEVICE, b"\xff")), "not JSON",
                     id="device-not-utf8"),
    ],
)
def test_damaged_streams_are_refused(stream, match):
    with pytest.raises(DeviceStateError, match=match):
        decode(stream())


def spaces_section(*, asids=1, groups=(0,), records=b"") -> bytes:
    payload = struct.pack("<II", asids, len(groups)) + struct.pack(f"<{len(groups)}I", *groups)
    return section(SectionType.ADDRESS_SPACES, payload + records)


def asid_record(asid=0, default=0, flags=0, reserved=0, entries=()) -> bytes:
    head = struct.pack("<IBBHQ", asid, default, flags, reserved, len(entries))
    return head + b"".join(entries)


def entry(iova=0x1000, size=0x1000, target=0, kind=1, perm=3) -> bytes:
    return ENTRY.pack(iova, size, target, kind, perm)


@pytest.mark.parametrize(
    ("spaces", "match"),
    [
        pytest.param(spaces_section(asids=3, records=asid_record()), "3 ASIDs need",
                     id="asid-count-past-end"),
        pytest.param(spaces_section(asids=1 << 31), "ASIDs need", id="absurd-asid-count"),
        pytest.param(spaces_section(records=asid_record(entries=[entry()])[:-8]),
                     "1 entries need 32 bytes", id="entries-past-end"),
        pytest.param(spaces_section(records=asid_record() + b"\0"), "1 bytes after",
                     id="trailing"),
        pytest.param(spaces_section(records=asid_record(default=2)), "default 2",
                     id="unknown-default"),
        pytest.param(spaces_section(records=asid_record(flags=2)), "unknown flags",
                     id="unknown-asid-flags"),
        pytest.param(spaces_section(records=asid_record(reserved=1)), "reserved 1",
                     id="reserved-set"),
        pytest.param(spaces_section(records=asid_record(entries=[entry(kind=0)])),
                     "target kind 0 is unknown", id="user-address-target"),
        pytest.param(spaces_section(records=asid_record(entries=[entry(perm=4)])),
                     "permission 4", id="unknown-perm"),
        pytest.param(spaces_section(records=asid_record(entries=[entry(size=0)])),
                     "empty", id="empty-entry"),
        pytest.param(spaces_section(records=asid_record(entries=[entry(), entry()])),
                     "unsorted or overlapping", id="overlap"),
        pytest.param(spaces_section(records=asid_record(entries=[entry(iova=U64)])),
                     "wraps", id="iova-wraps"),
        pytest.param(spaces_section(records=asid_record(entries=[entry()[:-1] + b"\1"])),
                     "reserved bytes", id="entry-padding"),
        pytest.param(spaces_section(records=asid_record(flags=1, entries=[entry()])),
                     "passthrough with 1 entries", id="passthrough-with-entries"),
        pytest.param(spaces_section(records=asid_record(asid=1)), "are not 0..0",
                     id="asid-numbering"),
        pytest.param(spaces_section(groups=(1,), records=asid_record()), "group 0 bound to ASID 1",
                     id="binding-to-missing-asid"),
    ],
)
def test_damaged_address_spaces_are_refused(spaces, match):
    with pytest.raises(DeviceStateError, match=match):
        decode(reseal(DEVICE + spaces))


def test_a_well_formed_address_spaces_section_by_hand():
    records = asid_record(default=1, flags=1) + asid_record(asid=1, entries=[entry(perm=1)])
    state = decode(reseal(DEVICE + spaces_section(asids=2, groups=(1,), records=records)))
    assert state.address_spaces == AddressSpacesState((1,), (
        IotlbState(0, DefaultMapping.IDENTITY, True),
        IotlbState(1, DefaultMapping.EMPTY, False, (IotlbEntry(0x1000, 0x1000, 0, 1, "gpa"),)),
    ))


@st.composite
def arbitrary_sections(draw) -> bytes:
    """Sections of known and unknown types, payloads mostly nonsense."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([SectionType.DEVICE, SectionType.ADDRESS_SPACES, 3, 0xFFFF]))
        if kind == SectionType.ADDRESS_SPACES and draw(st.booleans()):
            records = b"".join(
                asid_record(asid=a, default=draw(st.integers(0, 2)), flags=draw(st.integers(0, 2)),
                            entries=[entry(*draw(st.tuples(st.integers(0, U64), st.integers(0, U64),
                                                           st.integers(0, U64), st.integers(0, 2),
                                                           st.integers(0, 4))))
                                     for _ in range(draw(st.integers(0, 3)))])
                for a in range(draw(st.integers(0, 3)))
            )
            payload = spaces_section(asids=draw(st.integers(0, 4)),
                                     groups=tuple(draw(st.lists(st.integers(0, 4), max_size=3))),
                                     records=records)[SECTION.size:]
        else:
            payload = draw(st.binary(max_size=64))
        out += section(kind, payload, draw(st.sampled_from([0, 0, SECTION_OPTIONAL, 0x8000])))
    return out


@settings(max_examples=500, deadline=None)
@given(arbitrary_sections(), st.integers(0, 6))
def test_any_body_behind_a_good_header_decodes_or_is_refused(body, sections):
    """Past the checksum, nothing a writer of our format could not have written gets in."""
    try:
        state = decode(reseal(body, sections=sections))
    except DeviceStateError:
        return
    assert decode(encode(state)) == state
