"""The cells of the avocado VM suite (avocado variants, run.dict_variants).

QEMU_MATRIX: every combination of QEMU version x vIOMMU x queues x read mode,
with persistence "stock" (QEMU never negotiates the IOTLB persistence extension):
16 cells, each runs the core scenario (guest_core.py).

COVERING: 4 of those cells on which the heavier scenarios run (guest_scenarios.py);
every value of every axis appears at least once, and each QEMU version with
both vIOMMU settings once.

FRONTEND: the "front-end" value of the persistence axis: the project's
reference front-end (no QEMU, no guest) with the extension and IOTLB persistence
negotiated, on 1 and 4 queues, read-write and read-only (frontend_persist.py).
"""

from __future__ import annotations

import itertools

AXES = {
    "qemu": ("7.2", "10.0"),
    "viommu": ("off", "intel-iommu"),
    "queues": (1, 4),
    "mode": ("rw", "ro"),
}

QEMU_MATRIX = [
    dict(zip(AXES, values), persist="stock") for values in itertools.product(*AXES.values())
]

COVERING = [
    {"qemu": "7.2", "viommu": "off", "queues": 1, "mode": "rw", "persist": "stock"},
    # Not 10.0 + vIOMMU + 4 queues: QEMU 10.0 fails to start vhost at the first
    # guest reboot ("Fail to lookup the translated address ffffe000", the previous
    # boot's ring 1 IOVA). Its vhost_dev_start asks the vIOMMU for the used ring of
    # every queue and, since the upstream change that made that failure fatal,
    # gives up when a queue the firmware has not set up still holds a stale
    # address (7.2 ignored the result). That cell runs the core scenario only.
    {"qemu": "10.0", "viommu": "intel-iommu", "queues": 1, "mode": "rw", "persist": "stock"},
    {"qemu": "7.2", "viommu": "intel-iommu", "queues": 4, "mode": "ro", "persist": "stock"},
    {"qemu": "10.0", "viommu": "off", "queues": 1, "mode": "ro", "persist": "stock"},
]

FRONTEND = [
    {"frontend": "reference", "queues": q, "mode": mode, "persist": "front-end"}
    for q in (1, 4) for mode in ("rw", "ro")
]


def check_covering() -> None:
    for axis, values in AXES.items():
        seen = {cell[axis] for cell in COVERING}
        assert seen == set(values), f"COVERING misses {axis}={set(values) - seen}"
    assert all(cell in QEMU_MATRIX for cell in COVERING)


check_covering()
