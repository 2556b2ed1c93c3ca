"""The IOTLB's fast floor search against sortedcontainers' public way.

``_floor_entry`` reads SortedKeyList's sublists directly (the public
bisect-then-index costs microseconds per translation); if a sortedcontainers
release changed that layout, this is where it shows.
"""

from __future__ import annotations

import random

import pytest

from pyvhost_user.memory.iotlb import IotlbEntry, _floor_entry, _new_table


def public_floor(table, key):
    i = table.bisect_key_right(key) - 1
    return table[i] if i >= 0 else None


@pytest.mark.parametrize("count", [0, 1, 2, 999, 1000, 1001, 5000])
def test_floor_matches_the_public_search(count):
    rng = random.Random(count)
    table = _new_table()
    starts = rng.sample(range(0, 1 << 40, 4096), count)
    table.update(IotlbEntry(iova, 4096, 0x7F00_0000_0000, 3) for iova in starts)
    probes = [rng.randrange(0, (1 << 40) + 8192) for _ in range(2000)]
    probes += starts + [s - 1 for s in starts] + [s + 4095 for s in starts] + [0, (1 << 64) - 1]
    for key in probes:
        assert _floor_entry(table, key) is public_floor(table, key), key


def test_floor_after_removals_matches():
    rng = random.Random(7)
    table = _new_table()
    table.update(IotlbEntry(i * 8192, 4096, 0x7F00_0000_0000, 3) for i in range(4000))
    for _ in range(3000):  # shrink sublists, merge and split them
        del table[rng.randrange(len(table))]
        key = rng.randrange(0, 4000 * 8192)
        assert _floor_entry(table, key) is public_floor(table, key)
