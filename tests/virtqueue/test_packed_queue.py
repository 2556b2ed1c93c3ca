"""The device side of packed rings, driven by the reference driver-side packed ring."""

from __future__ import annotations

import os
import random

import pytest

from pyvhost_user.frontend.packed_ring import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    PackedRing,
    packed_base,
)
from pyvhost_user.memory import DirectSpace
from pyvhost_user.virtqueue import BadChain, InvalidQueueConfig, PackedQueue, QueueConfig, QueueCorrupted
from pyvhost_user.virtqueue.inflight import InflightRegion
from pyvhost_user.virtqueue.packed import decode_base, encode_base


def make_queue(ram, memory, size=8, *, event_idx=False, indirect=True, base=None,
               inflight=None, recover=False, ring=None):
    ring = ring or PackedRing(ram, size, event_idx=event_idx)
    config = QueueConfig(
        0, size=size, desc_addr=ring.desc_user_addr, avail_addr=ring.avail_user_addr,
        used_addr=ring.used_user_addr, base=ring.start_base if base is None else base,
    )
    queue = PackedQueue(config, DirectSpace(memory, "uva"), DirectSpace(memory, "gpa"),
                        event_idx=event_idx, indirect=indirect, inflight=inflight,
                        recover_inflight=recover)
    return ring, queue


def serve(queue, written=b""):
    """Pop everything available, complete it in order; the ids served."""
    served = []
    while (chain := queue.pop()) is not None:
        if written:
            chain.writable[0][: len(written)] = written
        queue.push_used(chain.head, len(written))
        served.append(chain.head)
    return served


def test_base_encoding_is_qemus():
    # virtio_queue_packed_get_last_avail_idx: avail | wrap << 15 | (used | wrap << 15) << 16
    assert encode_base(0, True, 0, True) == 0x8000_8000
    assert encode_base(5, False, 3, True) == 0x8003_0005
    assert decode_base(0x8041_0041) == (0x41, False, 0x41, True)


def test_chain_buffers_come_back_as_views_and_the_used_descriptor_is_written(ram, memory):
    ring, queue = make_queue(ram, memory)
    out_gpa, in_gpa = ram.alloc(64), ram.alloc(128)
    ram.write(out_gpa, b"request!")
    buffer_id = ring.add_chain([(out_gpa, 8, False), (in_gpa, 128, True)])
    assert queue.pending() == 0  # written, not yet published (head flags)
    ring.publish()
    assert queue.pending() == 1
    chain = queue.pop()
    assert chain.head == buffer_id
    assert b"".join(bytes(v) for v in chain.readable) == b"request!"
    assert chain.writable_len == 128
    chain.writable[0][:4] = b"done"
    queue.push_used(chain.head, 4)
    used = ring.read_descriptor(0)
    assert (used.id, used.length) == (buffer_id, 4)
    assert used.flags == (1 << 7) | (1 << 15) | VIRTQ_DESC_F_WRITE  # used in lap 1, len valid
    assert ring.pop_used() == [(buffer_id, 4)]
    assert ram.read(in_gpa, 4) == b"done"
    assert queue.pop() is None
    # Two descriptors were consumed: both sides are at position 2 now.
    assert queue.vring_base == encode_base(2, True, 2, True) == ring.start_base


def test_a_base_with_only_the_avail_half_starts_used_at_avail(ram, memory):
    """DPDK's virtio_user sends 0x8000 for a fresh packed ring (avail half only).
    Read literally, used would be a lap behind (wrap 0) and every used
    descriptor would carry flags the driver never takes as used."""
    ring, queue = make_queue(ram, memory, base=0x8000)
    assert (queue.avail_pos, queue.avail_wrap, queue.used_pos, queue.used_wrap) == (0, True, 0, True)
    bufs = [ram.alloc(16) for _ in range(20)]
    for round_ in range(20):  # two laps and a half: the used side wraps too
        buffer_id = ring.add_chain([(bufs[round_], 16, True)])
        ring.publish()
        assert serve(queue, b"x") == [buffer_id]
        assert ring.pop_used() == [(buffer_id, 1)]
    _, queue = make_queue(ram, memory, base=5)  # avail 5, lap 2, nothing else said
    assert (queue.avail_pos, queue.avail_wrap, queue.used_pos, queue.used_wrap) == (5, False, 5, False)
    # Both halves given: taken as they are, even where they differ.
    _, queue = make_queue(ram, memory, base=encode_base(3, True, 1, False))
    assert (queue.avail_pos, queue.avail_wrap, queue.used_pos, queue.used_wrap) == (3, True, 1, False)


@pytest.mark.parametrize("size", [1, 3, 7, 13, 100, 257])
def test_any_size_wraps_many_times_with_chains_across_the_end(ram, memory, size):
    """Sizes need not be powers of 2; chains of 1..3 descriptors run over the end
    of the ring, where the driver's wrap counter flips inside a chain."""
    ring, queue = make_queue(ram, memory, size=size)
    bufs = [ram.alloc(16) for _ in range(3)]
    rng = random.Random(size)
    for _round in range(4 * size + 20):
        length = rng.randint(1, min(3, size))
        segments = [(b, 16, i == length - 1) for i, b in enumerate(bufs[:length])]
        buffer_id = ring.add_chain(segments)
        ring.publish()
        chain = queue.pop()
        assert chain.head == buffer_id and chain.descriptor_count == length
        queue.push_used(chain.head, 1)
        assert ring.pop_used() == [(buffer_id, 1)]
    assert ring.free_descriptors == size and ring.in_flight == 0
    avail_pos, _, used_pos, used_wrap = decode_base(queue.vring_base)
    assert (avail_pos, used_pos, used_wrap) == (ring.next_used, ring.next_used, ring.used_wrap)


def test_out_of_order_completions_overwrite_chains_still_in_flight(ram, memory):
    """Used descriptors go where the device's used position is, over a chain that
    is still in flight; the driver skips by each completed chain's length."""
    ring, queue = make_queue(ram, memory, size=6)
    bufs = [ram.alloc(32) for _ in range(3)]
    a = ring.add_chain([(bufs[0], 16, False), (bufs[0] + 16, 16, True)])  # positions 0-1
    b = ring.add_chain([(bufs[1], 16, True)])  # position 2
    c = ring.add_chain([(bufs[2], 16, False), (bufs[2] + 16, 8, False), (bufs[2] + 24, 8, True)])
    ring.publish()
    chains = {chain.head: chain for chain in iter(queue.pop, None)}
    assert set(chains) == {a, b, c}
    queue.push_used(c, 8)  # written at position 0, over chain a's first descriptor
    assert ring.read_descriptor(0).id == c
    queue.push_used(a, 16)  # at position 3 (c took 3)
    queue.push_used(b, 16)  # at position 5
    assert ring.pop_used() == [(c, 8), (a, 16), (b, 16)]
    assert ring.free_descriptors == 6
    # The ring is reused from the start, after a wrap of both counters.
    d = ring.add_chain([(bufs[1], 16, True)])
    ring.publish()
    assert serve(queue) == [d]
    assert ring.pop_used() == [(d, 0)]


def test_indirect_chain_takes_one_ring_descriptor(ram, memory):
    ring, queue = make_queue(ram, memory, size=2)
    a, b = ram.alloc(16), ram.alloc(64)
    for _ in range(5):  # wraps: one descriptor per chain
        buffer_id = ring.add_chain([(a, 16, False), (b, 32, True), (b + 32, 32, True)],
                                   indirect=True)
        ring.publish()
        chain = queue.pop()
        assert chain.readable_len == 16 and chain.writable_len == 64
        assert chain.descriptor_count == 3
        queue.push_used(chain.head, 64)
        assert ring.pop_used() == [(buffer_id, 64)]


def test_zero_length_completion_leaves_write_flag_clear(ram, memory):
    ring, queue = make_queue(ram, memory)
    buf = ram.alloc(16)
    ring.add_chain([(buf, 16, False)])
    ring.publish()
    chain = queue.pop()
    queue.push_used(chain.head, 0)
    assert not ring.read_descriptor(0).flags & VIRTQ_DESC_F_WRITE


# -- notifications -------------------------------------------------------------------

def test_driver_event_flags_decide_interrupts(ram, memory):
    ring, queue = make_queue(ram, memory, size=4)
    buf = ram.alloc(16)

    def complete_one():
        ring.add_chain([(buf, 16, True)])
        ring.publish()
        serve(queue)
        ring.pop_used()

    ring.set_driver_event(RING_EVENT_FLAGS_DISABLE)
    complete_one()
    assert queue.needs_notification() is False
    ring.set_driver_event(RING_EVENT_FLAGS_ENABLE)
    complete_one()
    assert queue.needs_notification() is True


def test_event_idx_interrupts_only_when_the_driver_event_is_passed(ram, memory):
    ring, queue = make_queue(ram, memory, size=4, event_idx=True)
    buf = ram.alloc(16)

    def push(event=None):
        ring.pop_used()  # frees descriptors (and writes its own driver event)
        if event is not None:
            ring.set_driver_event(RING_EVENT_FLAGS_DESC, event)
        ring.add_chain([(buf, 16, True)])
        ring.publish()
        serve(queue)
        return queue.needs_notification()

    assert push(0 | 1 << 15) is True  # the first one always signals
    # The driver wants an interrupt when position 3 (lap 1) is used.
    assert push(3 | 1 << 15) is False  # used position 1 -> 2: not past 3
    assert push(3 | 1 << 15) is False  # 2 -> 3: not yet
    assert push(3 | 1 << 15) is True  # 3 -> 0 (wrapped): descriptor 3 was used
    assert push(1) is False  # position 1 of lap 0 (wrap bit clear): 0 -> 1
    assert push(1) is True  # 1 -> 2


def test_device_event_asks_for_a_kick_at_the_next_unread_descriptor(ram, memory):
    ring, queue = make_queue(ram, memory, size=3, event_idx=True)
    buf = ram.alloc(16)
    assert ring.device_event == (0, RING_EVENT_FLAGS_ENABLE)  # before the device says anything
    for n in range(1, 8):
        ring.add_chain([(buf, 16, True)])
        assert ring.publish() is True, f"chain {n}: the device asked for this kick"
        serve(queue)
        queue.enable_notifications()
        off_wrap, flags = ring.device_event
        assert flags == RING_EVENT_FLAGS_DESC
        assert (off_wrap & 0x7FFF, bool(off_wrap >> 15)) == (ring.next_avail, ring.avail_wrap)
        ring.pop_used()
    # Two chains published at once: one kick for the first new position only.
    ring.add_chain([(buf, 16, True)])
    ring.add_chain([(buf, 16, True)])
    assert ring.publish() is True
    ring.add_chain([(buf, 16, True)])
    assert ring.publish() is False  # the device has not read on: no kick needed


def test_without_event_idx_the_driver_always_kicks(ram, memory):
    ring, queue = make_queue(ram, memory, size=4)
    buf = ram.alloc(16)
    ring.add_chain([(buf, 16, True)])
    assert ring.publish() is True
    serve(queue)
    queue.enable_notifications()
    assert ring.device_event == (0, RING_EVENT_FLAGS_ENABLE)


# -- what the driver controls, checked -------------------------------------------

def test_a_descriptor_not_made_available_is_not_read(ram, memory):
    ring, queue = make_queue(ram, memory)
    buf = ram.alloc(16)
    # Right fields, wrong lap: AVAIL and USED both set is "used in lap 1".
    ring.write_descriptor(0, buf, 16, 0, (1 << 7) | (1 << 15))
    assert queue.pending() == 0 and queue.pop() is None


def test_buffer_id_out_of_range_is_refused(ram, memory):
    ring, queue = make_queue(ram, memory, size=4)
    ring.write_descriptor(0, ram.alloc(16), 16, 4, ring.avail_flags(True) | VIRTQ_DESC_F_WRITE)
    with pytest.raises(BadChain, match="buffer id 4"):
        queue.pop()


def test_buffer_id_reused_while_in_flight_corrupts_the_queue(ram, memory):
    ring, queue = make_queue(ram, memory, size=4)
    buf = ram.alloc(16)
    for position in (0, 1):
        ring.write_descriptor(position, buf, 16, 2, ring.avail_flags(True) | VIRTQ_DESC_F_WRITE)
    queue.pop()
    with pytest.raises(QueueCorrupted, match="buffer id 2"):
        queue.pop()


def test_chain_with_next_on_every_descriptor_is_refused(ram, memory):
    """NEXT everywhere: the walk stops at the ring's size (the packed "loop")."""
    ring, queue = make_queue(ram, memory, size=5)
    buf = ram.alloc(16)
    for position in range(5):
        ring.write_descriptor(position, buf, 16, 0, ring.avail_flags(True) | VIRTQ_DESC_F_NEXT)
    with pytest.raises(BadChain):
        queue.pop()


def test_chain_running_into_an_unavailable_descriptor_is_refused(ram, memory):
    ring, queue = make_queue(ram, memory, size=8)
    buf = ram.alloc(16)
    ring.write_descriptor(0, buf, 16, 0, ring.avail_flags(True) | VIRTQ_DESC_F_NEXT)
    with pytest.raises(BadChain, match="not available"):
        queue.pop()


@pytest.mark.parametrize(
    ("descriptors", "indirect_allowed", "match"),
    [
        ([("table", VIRTQ_DESC_F_INDIRECT)], False, "without INDIRECT_DESC"),
        ([("table", VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT), ("buf", VIRTQ_DESC_F_WRITE)], True,
         "chained with NEXT"),
        ([("buf", VIRTQ_DESC_F_NEXT), ("table", VIRTQ_DESC_F_INDIRECT)], True, "chained with NEXT"),
        ([("nested", VIRTQ_DESC_F_INDIRECT)], True, "inside an indirect table"),
        ([("short", VIRTQ_DESC_F_INDIRECT)], True, "not a multiple of 16"),
        ([("buf", VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT), ("buf", 0)], True,
         "readable descriptor after a writable"),
        ([("unmapped", VIRTQ_DESC_F_WRITE)], True, "not mapped"),
    ],
    ids=["not-negotiated", "indirect-then-next", "indirect-after-direct", "nested",
         "bad-length", "readable-after-writable", "unmapped"],
)
def test_indirect_and_buffer_misuse_is_refused(ram, memory, descriptors, indirect_allowed, match):
    ring, queue = make_queue(ram, memory, indirect=indirect_allowed)
    buf = ram.alloc(16)
    table = ram.alloc(32)
    nested = ram.alloc(16)
    ram.write(table, (buf).to_bytes(8, "little") + (16).to_bytes(4, "little") + bytes(2)
              + VIRTQ_DESC_F_WRITE.to_bytes(2, "little") + bytes(16))
    ram.write(nested, table.to_bytes(8, "little") + (32).to_bytes(4, "little") + bytes(2)
              + VIRTQ_DESC_F_INDIRECT.to_bytes(2, "little"))
    where = {"buf": (buf, 16), "table": (table, 32), "nested": (nested, 16),
             "short": (table, 24), "unmapped": (1 << 50, 16)}
    # Later descriptors first, the head's flags last (as a driver must).
    for position in reversed(range(len(descriptors))):
        name, flags = descriptors[position]
        addr, length = where[name]
        ring.write_descriptor(position, addr, length, 0, ring.avail_flags(True) | flags)
    with pytest.raises(BadChain, match=match):
        queue.pop()


def test_misaligned_or_oversized_configuration_is_refused(ram, memory):
    ring = PackedRing(ram, 4)
    good = dict(size=4, desc_addr=ring.desc_user_addr, avail_addr=ring.avail_user_addr,
                used_addr=ring.used_user_addr)
    space = DirectSpace(memory, "uva"), DirectSpace(memory, "gpa")
    for change in ({"desc_addr": ring.desc_user_addr + 8}, {"avail_addr": ring.avail_user_addr + 2},
                   {"size": 40000}, {"base": encode_base(4, True, 0, True)},
                   {"base": encode_base(0, True, 5, True)}):
        with pytest.raises(InvalidQueueConfig):
            PackedQueue(QueueConfig(0, **{**good, **change}), *space, event_idx=False,
                        indirect=True)


def test_restart_from_the_base_it_answered(ram, memory):
    """GET_VRING_BASE then SET_VRING_BASE with the same value: a new queue object
    picks up exactly where the old one stopped, in the middle of a lap."""
    ring, queue = make_queue(ram, memory, size=5)
    buf = ram.alloc(16)
    for _ in range(4):
        ring.add_chain([(buf, 8, False), (buf + 8, 8, True)])
        ring.publish()
        serve(queue)
        ring.pop_used()
    base = queue.vring_base
    assert decode_base(base) == (3, False, 3, False)  # 8 descriptors: one lap and 3
    _, queue = make_queue(ram, memory, size=5, base=base, ring=ring)
    ring.add_chain([(buf, 8, False), (buf + 8, 8, True)])
    ring.publish()
    assert len(serve(queue)) == 1
    assert len(ring.pop_used()) == 1


# -- inflight record (packed layout) --------------------------------------------------

def inflight_region(size):
    region, fd = InflightRegion.allocate(1, size, packed=True)
    os.close(fd)
    return region


@pytest.mark.parametrize("published", [False, True], ids=["died-before-publish",
                                                           "died-after-publish"])
def test_restart_resubmits_what_was_in_flight_in_fetch_order(ram, memory, published):
    """A back-end dies with chains in flight, completed out of order, one completion
    cut short; the next one resumes at the recorded used position, resubmits the
    rest in the order they were fetched, and reads on after them."""
    size = 8
    region = inflight_region(size)
    record = region.queues[0]
    ring, queue = make_queue(ram, memory, size=size, inflight=record)
    bufs = [ram.alloc(32) for _ in range(4)]
    ids = [ring.add_chain([(b, 16, False), (b + 16, 16, True)]) for b in bufs]  # the whole ring
    ring.publish()
    chains = [queue.pop() for _ in range(3)]  # a, b, c fetched (6 descriptors); d waits
    assert [c.head for c in chains] == ids[:3]
    queue.push_used(ids[1], 16)  # b done
    # c's completion cut short: the record moved, the ring maybe.
    count, entry = queue._in_flight.pop(ids[2])
    following = queue.used_pos + count
    record.release_before_publish(entry, following % size, queue.used_wrap ^ (following >= size))
    if published:
        ring._desc16[8 * queue.used_pos + 6] = ids[2]
        ring._desc32 = ring._desc.cast("I")
        ring._desc32[4 * queue.used_pos + 2] = 16
        ring._desc16[8 * queue.used_pos + 7] = (1 << 7) | (1 << 15) | VIRTQ_DESC_F_WRITE
    # A new back-end, told the stale base QEMU keeps for packed rings.
    _, restarted = make_queue(ram, memory, size=size, inflight=record, recover=True,
                              ring=ring, base=0x8000_8000)
    expected = [ids[0]] if published else [ids[0], ids[2]]
    assert [r[0] for r in restarted.resubmit] == expected
    assert restarted.pending() == len(expected)
    served = serve(restarted, b"ok")
    assert served == expected + [ids[3]]  # then d, read from the ring
    completed = dict(ring.pop_used())
    assert set(completed) == set(ids)
    assert ram.read(bufs[0] + 16, 2) == b"ok"


def test_record_of_an_orderly_stop_resumes_at_the_used_position(ram, memory):
    size = 6
    record = inflight_region(size).queues[0]
    ring, queue = make_queue(ram, memory, size=size, inflight=record)
    buf = ram.alloc(16)
    for _ in range(9):
        ring.add_chain([(buf, 16, True)])
        ring.publish()
        serve(queue)
        ring.pop_used()
    assert record.used_position == (3, False)
    _, restarted = make_queue(ram, memory, size=size, inflight=record, recover=True,
                              ring=ring, base=0x8000_8000)
    assert restarted.vring_base == encode_base(3, False, 3, False) == ring.start_base
    assert not restarted.resubmit


def test_record_for_another_queue_size_is_refused(ram, memory):
    record = inflight_region(8).queues[0]
    record.initialize(0, True)
    record.queue_size = 4  # as if the region were mapped for a ring of 4
    with pytest.raises(InvalidQueueConfig):
        make_queue(ram, memory, size=4, inflight=record, recover=True)


def test_start_base_helper_matches_the_backend_encoding():
    assert packed_base(3, False, 9, True) == encode_base(3, False, 9, True)


def test_more_than_a_lap_used_between_checks_always_signals(ram, memory):
    """Used positions are modulo the ring size: after a lap or more of used
    descriptors since the last check, [old, new) cannot show whether the
    driver's event was passed (here it was, in the lap that is hidden)."""
    # The driver's event is written by hand (a ring without event_idx leaves it alone).
    ring, queue = make_queue(ram, memory, event_idx=True, ring=PackedRing(ram, 8))
    buf = ram.alloc(16)

    def one_more():
        ring.add_chain([(buf, 16, True)])
        ring.publish()
        serve(queue)
        ring.pop_used()

    one_more()
    assert queue.needs_notification()          # the first check: always (used at 1)
    ring.set_driver_event(2, 5 | 1 << 15)       # interrupt when position 5 of lap 1 is used
    for _ in range(9):                          # 1..7 of lap 1 (past 5), then 0..1 of lap 2
        one_more()
    assert queue.used_pos == 2 and not queue.used_wrap
    assert queue.needs_notification()
    # Within a lap the event still decides: 7 of this lap is not reached at 4.
    ring.set_driver_event(2, 7)
    one_more()
    one_more()
    assert queue.used_pos == 4 and not queue.needs_notification()
