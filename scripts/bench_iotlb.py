#!/usr/bin/env python3
"""IOTLB scaling: map, lookup and invalidate per operation at 1k..1M entries.

Prints the time per operation at each size and the fitted growth exponent
(slope of log(time per op) against log(entries): ~0 for O(log n) or O(1),
1 for O(n)), and reset_map's cost at each size (it should not grow).

    .venv/bin/python scripts/bench_iotlb.py [--max 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from pyvhost_user.memory import GuestMemory, map_region
from pyvhost_user.memory.iotlb import PERM_READ, PERM_WRITE, DefaultMapping, Iotlb

PAGE = 4096
UVA = 0x7F00_0000_0000


def fitted_exponent(sizes: list[int], per_op: list[float]) -> float:
    xs = [math.log(n) for n in sizes]
    ys = [math.log(t) for t in per_op]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure(n: int, memory: GuestMemory, probes: int) -> dict[str, float]:
    rng = random.Random(n)
    iotlb = Iotlb(0, memory, DefaultMapping.EMPTY)
    pages = list(range(n))
    rng.shuffle(pages)
    t0 = time.perf_counter()
    for p in pages:  # every entry a distinct IOVA page, aliasing a small uaddr range
        iotlb.update_refusing_overlap(p * PAGE, PAGE, UVA + (p % 256) * PAGE, PERM_READ | PERM_WRITE)
    map_s = (time.perf_counter() - t0) / n
    sample = [rng.randrange(n) * PAGE for _ in range(probes)]
    t0 = time.perf_counter()
    for iova in sample:
        iotlb.translate(iova, 512, PERM_WRITE)
    lookup_s = (time.perf_counter() - t0) / probes
    t0 = time.perf_counter()
    for iova in sample[: probes // 2]:
        iotlb.invalidate_overlapping_whole(iova, PAGE)
    invalidate_s = (time.perf_counter() - t0) / (probes // 2)
    t0 = time.perf_counter()
    iotlb.reset_map()
    reset_s = time.perf_counter() - t0
    return {"map": map_s, "lookup": lookup_s, "invalidate": invalidate_s, "reset_map": reset_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=1_000_000)
    parser.add_argument("--probes", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    fd = os.memfd_create("bench-iotlb")
    os.ftruncate(fd, 1 << 20)
    memory = GuestMemory()
    memory.add(map_region(fd, 0, 1 << 20, UVA, 0))
    os.close(fd)
    sizes = [n for n in (1_000, 10_000, 100_000, 1_000_000) if n <= args.max]
    rows = {}
    print(f"{'entries':>10} {'map us':>9} {'lookup us':>10} {'invalidate us':>14} {'reset_map us':>13}")
    for n in sizes:
        r = measure(n, memory, args.probes)
        rows[n] = r
        print(f"{n:>10} {r['map'] * 1e6:>9.2f} {r['lookup'] * 1e6:>10.2f} "
              f"{r['invalidate'] * 1e6:>14.2f} {r['reset_map'] * 1e6:>13.1f}", flush=True)
    exponents = {
        op: fitted_exponent(sizes, [rows[n][op] for n in sizes])
        for op in ("map", "lookup", "invalidate")
    }
    print("fitted growth exponent (0 = flat, 1 = linear): "
          + ", ".join(f"{op} {e:.2f}" for op, e in exponents.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "exponents": exponents}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
