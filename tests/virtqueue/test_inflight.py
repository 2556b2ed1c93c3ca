"""Inflight tracking: what a back-end that dies mid-request leaves for the next one."""

from __future__ import annotations

import os

import pytest

from pyvhost_user.frontend.split_ring import SplitRing
from pyvhost_user.memory import DirectSpace, GuestMemory
from pyvhost_user.virtqueue import InvalidQueueConfig, QueueConfig, SplitQueue
from pyvhost_user.virtqueue.inflight import InflightRegion, queue_region_size

SIZE = 16


@pytest.fixture
def region():
    region, fd = InflightRegion.allocate(1, SIZE)
    yield region, fd
    os.close(fd)


def backend_queue(ring: SplitRing, memory: GuestMemory, inflight, base: int) -> SplitQueue:
    config = QueueConfig(0, size=SIZE, desc_addr=ring.desc_user_addr,
                         avail_addr=ring.avail_user_addr, used_addr=ring.used_user_addr, base=base)
    queue = SplitQueue(config, DirectSpace(memory, "uva"), DirectSpace(memory, "gpa"),
                       event_idx=False, indirect=False, eager=False, inflight=inflight)
    queue.ensure_rings()
    return queue


def test_region_layout_is_64_byte_aligned():
    assert queue_region_size(128) == 2112  # 16 + 16 * 128, rounded up to 64
    assert queue_region_size(1) == 64


def test_a_new_back_end_resubmits_what_the_dead_one_took_in_pop_order(ram, memory, region):
    inflight_region, fd = region
    ring = SplitRing(ram, SIZE)
    buf = ram.alloc(64)
    heads = [ring.add_chain([(buf, 64, True)]) for _ in range(6)]
    ring.publish()
    first = backend_queue(ring, memory, inflight_region.queues[0], base=0)
    taken = [first.pop().head for _ in range(5)]
    assert taken == heads[:5]
    first.push_used(taken[3], 0)  # completions out of order: 4th, then 1st
    first.push_used(taken[0], 0)
    del first  # the back-end dies here: 3 taken and never completed, 1 never taken

    # The front-end hands the same buffer to the next back-end (SET_INFLIGHT_FD) and
    # restarts the ring at the used index, as QEMU does after a crash.
    again = InflightRegion(fd, inflight_region.mmap_size, 0, 1, SIZE)
    second = backend_queue(ring, memory, again.queues[0], base=ring.used_idx)
    assert list(second.resubmit) == [taken[1], taken[2], taken[4]]
    served = []
    while (chain := second.pop()) is not None:
        served.append(chain.head)
        second.push_used(chain.head, 0)
    assert served == [taken[1], taken[2], taken[4], heads[5]]  # then the one never taken
    assert sorted(h for h, _ in ring.pop_used()) == sorted(heads)


def test_a_crash_between_used_index_and_inflight_flag_finishes_the_last_batch(ram, memory, region):
    inflight_region, fd = region
    ring = SplitRing(ram, SIZE)
    buf = ram.alloc(64)
    ring.add_chain([(buf, 64, True)])
    ring.publish()
    first = backend_queue(ring, memory, inflight_region.queues[0], base=0)
    head = first.pop().head
    # push_used without its last step: the used index moved, the flag is still set
    first.inflight.mark_used_before_publish(head)
    first.used16[2] = head  # used.ring[0].id
    first.used16[1] = 1  # used.idx
    again = InflightRegion(fd, inflight_region.mmap_size, 0, 1, SIZE)
    second = backend_queue(ring, memory, again.queues[0], base=1)
    assert not second.resubmit  # completed: not resubmitted twice
    assert second.pop() is None


def test_a_buffer_for_another_queue_size_is_refused(ram, memory, region):
    inflight_region, fd = region
    ring = SplitRing(ram, SIZE)
    inflight_region.queues[0].u16[5] = SIZE * 2  # made for a ring of 32
    with pytest.raises(InvalidQueueConfig, match="queue size"):
        backend_queue(ring, memory, inflight_region.queues[0], base=0)


def test_a_too_small_buffer_is_refused(region):
    _, fd = region
    with pytest.raises(InvalidQueueConfig, match="need"):
        InflightRegion(fd, 64, 0, 4, SIZE)
