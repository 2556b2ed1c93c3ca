"""Random rings in guest memory through the descriptor walker and the blk device, in-process.

Each example writes a random ring into memfd guest RAM (well-formed requests of
every type, then loops, out-of-range next indices and addresses, zero and huge
lengths, indirect tables inside indirect tables or naming the ring itself,
write flags in the wrong places, heads past the ring, avail/used indices near
the 16-bit wrap, a random avail index) and drains it with ``SplitQueue.pop``,
``BlkDevice.process`` and ``push_used``. Properties (``fuzzlib.run_chain_case``):

* only ``BadChain``/``QueueCorrupted`` (``InvalidQueueConfig`` on activation)
  or a completed request come out: any other exception fails the example;
* every view a chain carries is a slice of one of the memfd mappings, inside
  the mapped region (its address checked with ctypes);
* the views add up to the chain's lengths, the used length is at most the
  writable length;
* a pop + process returns within ``CHAIN_SECONDS``;
* the image changes only for an OUT / WRITE_ZEROES / DISCARD answered OK, and
  then only in the range it names (with the data it carries, zeros for
  WRITE_ZEROES).
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzlib

pytestmark = pytest.mark.timeout(300)

SEEN: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = fuzzlib.RingRig(tmp_path_factory.mktemp("walker") / "disk.img")
    yield rig
    rig.close()


@pytest.fixture(scope="module", autouse=True)
def outcome_summary():
    yield
    if SEEN:
        fuzzlib.REPORTS.append(("descriptor walker", fuzzlib.summary(SEEN, "outcomes")))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_rings_only_end_in_documented_outcomes(rig, data):
    outcome = fuzzlib.run_chain_case(rig, fuzzlib.HypothesisDraw(data))
    SEEN.update(outcome.results)


def test_the_oracles_see_each_outcome(rig):
    """The generator reaches what the properties are about (a fuzzer that never
    completes a write or never breaks a chain proves nothing)."""
    import random

    outcome = fuzzlib.ChainOutcome()
    for seed in range(300):
        fuzzlib.run_chain_case(rig, fuzzlib.RandomDraw(random.Random(seed)), outcome)
    kinds = " | ".join(outcome.results)
    for needed in ("completed IN status 0", "completed OUT status 0",
                   "completed WRITE_ZEROES status 0", "completed DISCARD status 0",
                   "BadChain", "QueueCorrupted", "status 1", "status 2"):
        assert needed in kinds, f"never saw {needed!r}: {kinds}"
