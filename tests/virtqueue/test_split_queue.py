"""The device side of split rings, driven by the reference driver-side ring."""

from __future__ import annotations

import pytest

from pyvhost_user.frontend.split_ring import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitRing,
)
from pyvhost_user.memory import DirectSpace
from pyvhost_user.virtqueue import BadChain, InvalidQueueConfig, QueueConfig, QueueCorrupted, SplitQueue


def make_queue(ram, memory, size=8, *, event_idx=False, indirect=True, start_index=0):
    ring = SplitRing(ram, size, event_idx=event_idx, start_index=start_index)
    config = QueueConfig(
        0,
        size=size,
        desc_addr=ring.desc_user_addr,
        avail_addr=ring.avail_user_addr,
        used_addr=ring.used_user_addr,
        base=start_index,
    )
    queue = SplitQueue(
        config,
        DirectSpace(memory, "uva"),
        DirectSpace(memory, "gpa"),
        event_idx=event_idx,
        indirect=indirect,
    )
    return ring, queue


def test_chain_buffers_come_back_as_views_by_direction(ram, memory):
    ring, queue = make_queue(ram, memory)
    out_gpa, in_gpa = ram.alloc(64), ram.alloc(128)
    ram.write(out_gpa, b"request!")
    head = ring.add_chain([(out_gpa, 8, False), (in_gpa, 128, True)])
    ring.publish()
    chain = queue.pop()
    assert chain.head == head
    assert b"".join(bytes(v) for v in chain.readable) == b"request!"
    assert chain.writable_len == 128
    chain.writable[0][:4] = b"done"
    queue.push_used(chain.head, 4)
    assert ring.pop_used() == [(head, 4)]
    assert ram.read(in_gpa, 4) == b"done"
    assert queue.pop() is None


def test_buffer_straddling_two_regions_is_two_views(ram, memory):
    ring, queue = make_queue(ram, memory)
    gpa = ram.alloc_straddling(8192)
    ring.add_chain([(gpa, 8192, True)])
    ring.publish()
    chain = queue.pop()
    assert len(chain.writable) == 2 and chain.writable_len == 8192


def test_indirect_chain(ram, memory):
    ring, queue = make_queue(ram, memory)
    a, b = ram.alloc(16), ram.alloc(16)
    ring.add_chain([(a, 16, False), (b, 16, True)], indirect=True)
    ring.publish()
    chain = queue.pop()
    assert chain.readable_len == 16 and chain.writable_len == 16


def test_indices_wrap_at_65536(ram, memory):
    ring, queue = make_queue(ram, memory, size=4, start_index=65534)
    buf = ram.alloc(16)
    for _round in range(3):
        for _ in range(3):
            ring.add_chain([(buf, 16, True)])
        ring.publish()
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, 0)
        assert len(ring.pop_used()) == 3
    assert queue.last_avail_idx == (65534 + 9) & 0xFFFF


def corrupt(ring: SplitRing, descriptors: list[tuple[int, int, int, int]], head: int = 0) -> None:
    ids = ring.take_descriptors(len(descriptors))
    for i, (addr, length, flags, next_) in zip(ids, descriptors):
        ring.write_descriptor(i, addr, length, flags, next_)
    ring.push_avail(head, ids)
    ring.publish()


@pytest.mark.parametrize(
    ("descriptors", "reason"),
    [
        ([(0x1000, 16, VIRTQ_DESC_F_NEXT, 1), (0x2000, 16, VIRTQ_DESC_F_NEXT, 0)], "loop"),
        ([(0x1000, 16, VIRTQ_DESC_F_NEXT, 0)], "loop"),  # points at itself
        ([(0x1000, 16, VIRTQ_DESC_F_NEXT, 99)], "next index"),
        ([(0x3000_0000, 16, 0, 0)], "not mapped"),  # in the hole between regions
        ([(2**64 - 8, 16, 0, 0)], "not mapped"),  # wraps
        (
            [(0x1000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x2000, 16, 0, 0)],
            "readable descriptor after a writable",
        ),
        ([(0x1000, 20, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        ([(0x1000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1), (0, 1, 0, 0)], "NEXT"),
    ],
)
def test_bad_chains_are_refused_with_a_reason(ram, memory, descriptors, reason):
    ring, queue = make_queue(ram, memory)
    corrupt(ring, descriptors)
    with pytest.raises(BadChain, match=reason):
        queue.pop()


def test_indirect_inside_indirect_is_refused(ram, memory):
    ring, queue = make_queue(ram, memory)
    inner = ram.alloc(16)
    table = ram.alloc(16)
    ram.write(table, (inner).to_bytes(8, "little") + (16).to_bytes(4, "little")
              + VIRTQ_DESC_F_INDIRECT.to_bytes(2, "little") + bytes(2))
    corrupt(ring, [(table, 16, VIRTQ_DESC_F_INDIRECT, 0)])
    with pytest.raises(BadChain, match="inside an indirect"):
        queue.pop()


def test_loop_inside_an_indirect_table_is_refused(ram, memory):
    ring, queue = make_queue(ram, memory)
    table = ram.alloc(32)
    entry = lambda nxt: (0x1000).to_bytes(8, "little") + (8).to_bytes(4, "little") + (
        VIRTQ_DESC_F_NEXT
    ).to_bytes(2, "little") + nxt.to_bytes(2, "little")
    ram.write(table, entry(1) + entry(0))
    corrupt(ring, [(table, 32, VIRTQ_DESC_F_INDIRECT, 0)])
    with pytest.raises(BadChain, match="loop"):
        queue.pop()


def test_indirect_without_the_feature_is_refused(ram, memory):
    ring, queue = make_queue(ram, memory, indirect=False)
    ring.add_chain([(ram.alloc(16), 16, False)], indirect=True)
    ring.publish()
    with pytest.raises(BadChain, match="INDIRECT_DESC"):
        queue.pop()


def test_avail_index_running_ahead_is_ring_corruption(ram, memory):
    ring, queue = make_queue(ram, memory)
    ring.avail_idx = 9  # 9 entries on a ring of 8
    with pytest.raises(QueueCorrupted):
        queue.pop()


def test_head_outside_the_table_is_ring_corruption(ram, memory):
    ring, queue = make_queue(ram, memory)
    ring.push_avail(1000)
    ring.publish()
    with pytest.raises(QueueCorrupted):
        queue.pop()


def test_event_idx_notifications_follow_used_event(ram, memory):
    ring, queue = make_queue(ram, memory, event_idx=True)
    buf = ram.alloc(16)
    ring.used_event = 2  # interrupt me when the used index passes 2
    for _ in range(4):
        ring.add_chain([(buf, 16, True)])
    ring.publish()
    signals = []
    for _ in range(4):
        chain = queue.pop()
        queue.push_used(chain.head, 0)
        signals.append(queue.needs_notification())
    assert signals == [True, False, True, False]  # first is always signalled
    queue.enable_notifications()
    assert ring.avail_event == 4


def test_no_interrupt_flag_without_event_idx(ram, memory):
    ring, queue = make_queue(ram, memory)
    ring.avail_flags = 1
    ring.add_chain([(ram.alloc(16), 16, True)])
    ring.publish()
    queue.push_used(queue.pop().head, 0)
    assert not queue.needs_notification()


@pytest.mark.parametrize("field", ["desc_addr", "avail_addr", "used_addr"])
def test_unmapped_or_misaligned_rings_are_refused(ram, memory, field):
    ring = SplitRing(ram, 8)
    config = QueueConfig(
        0, size=8, desc_addr=ring.desc_user_addr, avail_addr=ring.avail_user_addr,
        used_addr=ring.used_user_addr,
    )
    for bad in (ring.desc_gpa, getattr(config, field) + 1):  # a gpa is not a user address
        setattr(config, field, bad)
        with pytest.raises(InvalidQueueConfig):
            SplitQueue(config, DirectSpace(memory, "uva"), DirectSpace(memory, "gpa"),
                       event_idx=False, indirect=False)


def test_size_must_be_a_power_of_two(ram, memory):
    config = QueueConfig(0, size=6, desc_addr=0, avail_addr=0, used_addr=0)
    with pytest.raises(InvalidQueueConfig, match="power of 2"):
        SplitQueue(config, DirectSpace(memory, "uva"), DirectSpace(memory, "gpa"),
                   event_idx=False, indirect=False)
