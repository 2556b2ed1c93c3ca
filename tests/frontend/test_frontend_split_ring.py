"""SplitRing alone, with the test playing the device."""

from __future__ import annotations

import struct

import pytest

from pyvhost_user.frontend.errors import ProtocolViolation, RingError
from pyvhost_user.frontend.guest_ram import MiB, GuestRam
from pyvhost_user.frontend.split_ring import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Descriptor,
    SplitRing,
    vring_need_event,
)


@pytest.fixture
def ram():
    with GuestRam([(0, 1 * MiB)]) as guest_ram:
        yield guest_ram


def device_complete(ring: SplitRing, entries: list[tuple[int, int]]) -> None:
    """Play the device: write used elements, then move used.idx."""
    idx = ring.used_idx
    for head, length in entries:
        slot = idx % ring.size
        ring.ram.write(ring.used_gpa + 4 + 8 * slot, struct.pack("<II", head, length))
        idx = (idx + 1) & 0xFFFF
    ring.ram.write(ring.used_gpa + 2, struct.pack("<H", idx))


def device_pop_avail(ring: SplitRing, last_avail: int) -> list[int]:
    count = (ring.avail_idx - last_avail) & 0xFFFF
    return [ring.avail_entry((last_avail + i) % ring.size) for i in range(count)]


def test_layout_alignment_and_sizes(ram):
    ring = SplitRing(ram, 256)
    assert ring.desc_gpa % 16 == 0
    assert ring.avail_gpa % 2 == 0
    assert ring.used_gpa % 4 == 0
    # No overlap: desc 16*N, avail 6+2N, used 6+8N.
    spans = sorted(
        [(ring.desc_gpa, 16 * 256), (ring.avail_gpa, 6 + 512), (ring.used_gpa, 6 + 2048)]
    )
    for (a, alen), (b, _) in zip(spans, spans[1:]):
        assert a + alen <= b
    assert ring.desc_user_addr == ram.uva(ring.desc_gpa) != ring.desc_gpa


def test_size_must_be_a_power_of_two(ram):
    for bad in (0, 3, 100, 65536):
        with pytest.raises(RingError):
            SplitRing(ram, bad)


def test_chain_descriptors_and_publish(ram):
    ring = SplitRing(ram, 8)
    head = ring.add_chain([(0x1000, 16, False), (0x2000, 512, True), (0x3000, 1, True)])
    assert ring.avail_idx == 0  # not published yet
    assert ring.publish() is True
    assert ring.avail_idx == 1
    assert ring.avail_entry(0) == head
    first = ring.read_descriptor(head)
    assert first == Descriptor(0x1000, 16, VIRTQ_DESC_F_NEXT, first.next)
    second = ring.read_descriptor(first.next)
    assert (second.addr, second.length, second.flags) == (
        0x2000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)
    third = ring.read_descriptor(second.next)
    assert (third.addr, third.length, third.flags) == (0x3000, 1, VIRTQ_DESC_F_WRITE)
    assert ring.free_descriptors == 5


def test_no_notify_flag_suppresses_the_kick(ram):
    ring = SplitRing(ram, 8)
    ram.write(ring.used_gpa, struct.pack("<H", VIRTQ_USED_F_NO_NOTIFY))
    ring.add_chain([(0x1000, 1, True)])
    assert ring.publish() is False
    assert ring.publish() is False  # nothing new


def test_pop_used_recycles_descriptors(ram):
    ring = SplitRing(ram, 4)
    heads = [ring.add_chain([(0x1000, 16, False), (0x2000, 1, True)]) for _ in range(2)]
    with pytest.raises(RingError):
        ring.add_chain([(0x1000, 1, True)])  # 4 descriptors, all taken
    ring.publish()
    device_complete(ring, [(heads[1], 1), (heads[0], 7)])
    assert ring.pop_used() == [(heads[1], 1), (heads[0], 7)]
    assert ring.free_descriptors == 4 and ring.in_flight == 0
    assert ring.pop_used() == []


def test_wrap_around_of_16_bit_indices(ram):
    ring = SplitRing(ram, 4, start_index=0xFFFE)
    assert ring.avail_idx == ring.used_idx == 0xFFFE
    last_avail = 0xFFFE
    for round_ in range(6):
        head = ring.add_chain([(0x1000 + round_, 1, True)])
        ring.publish()
        assert device_pop_avail(ring, last_avail) == [head]
        last_avail = (last_avail + 1) & 0xFFFF
        device_complete(ring, [(head, 1)])
        assert ring.pop_used() == [(head, 1)]
    assert ring.avail_idx == ring.used_idx == ring.last_used_idx == 4


def test_indirect_chain(ram):
    ring = SplitRing(ram, 4)
    before = ram.allocated_bytes
    chain = [(0x1000, 16, False), (0x2000, 8, True), (0x3000, 1, True)]
    head = ring.add_chain(chain, indirect=True)
    descriptor = ring.read_descriptor(head)
    assert descriptor.flags == VIRTQ_DESC_F_INDIRECT and descriptor.length == 48
    table = [struct.unpack("<QIHH", ram.read(descriptor.addr + 16 * i, 16)) for i in range(3)]
    assert table == [
        (0x1000, 16, VIRTQ_DESC_F_NEXT, 1),
        (0x2000, 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        (0x3000, 1, VIRTQ_DESC_F_WRITE, 0),
    ]
    assert ring.free_descriptors == 3
    ring.publish()
    device_complete(ring, [(head, 9)])
    ring.pop_used()
    assert ram.allocated_bytes == before  # the indirect table was freed


def test_event_idx_fields(ram):
    ring = SplitRing(ram, 8, event_idx=True)
    avail_event_gpa = ring.used_gpa + 4 + 8 * 8
    # The device asks to be kicked when avail.idx passes 1 (i.e. on the 2nd buffer).
    ram.write(avail_event_gpa, struct.pack("<H", 1))
    heads = [ring.add_chain([(0x1000, 1, True)])]
    assert ring.publish() is False  # 0 -> 1 does not pass avail_event 1
    heads.append(ring.add_chain([(0x1000, 1, True)]))
    assert ring.publish() is True  # 1 -> 2 does
    device_complete(ring, [(heads[0], 1)])
    assert ring.pop_used() == [(heads[0], 1)]
    assert ring.used_event == 1  # interrupt me on the next used entry
    assert vring_need_event(0xFFFF, 0, 0xFFFE) and not vring_need_event(5, 3, 2)


def test_used_entry_for_a_head_not_in_flight_is_a_violation(ram):
    ring = SplitRing(ram, 4)
    ring.add_chain([(0x1000, 1, True)])
    ring.publish()
    device_complete(ring, [(3, 1)])
    with pytest.raises(ProtocolViolation):
        ring.pop_used()


def test_used_idx_jumping_past_the_ring_is_a_violation(ram):
    ring = SplitRing(ram, 4)
    ram.write(ring.used_gpa + 2, struct.pack("<H", 5))
    with pytest.raises(ProtocolViolation):
        ring.pop_used()


def test_raw_corrupt_chain(ram):
    ring = SplitRing(ram, 4)
    ids = ring.take_descriptors(2)
    ring.write_descriptor(ids[0], 0x1000, 16, VIRTQ_DESC_F_NEXT, ids[1])
    ring.write_descriptor(ids[1], 0xDEAD_0000_0000, 8, VIRTQ_DESC_F_NEXT, ids[0])  # a loop
    ring.push_avail(ids[0], owned=ids)
    ring.publish()
    assert ring.read_descriptor(ids[1]).next == ids[0]
    assert ring.avail_entry(0) == ids[0]
    device_complete(ring, [(ids[0], 0)])
    assert ring.pop_used() == [(ids[0], 0)]
    assert ring.free_descriptors == 4


def test_reset_and_release(ram):
    ring = SplitRing(ram, 4, start_index=7)
    ring.add_chain([(0x1000, 1, True)], indirect=True)
    ring.publish()
    ring.reset()
    assert ring.avail_idx == ring.used_idx == 0 and ring.free_descriptors == 4
    ring.release()
    assert ram.allocated_bytes == 0
