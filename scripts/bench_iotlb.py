#!/usr/bin/env python3
"""IOTLB costs: per operation to 1M entries, reset against mapped size, and
translation as a share of a request.

Three parts (``--parts``, all by default):

- ``ops``: map, lookup and invalidate per operation at 1k..1M entries, in
  process, with the fitted growth exponent (slope of log(time per op) against
  log(entries): ~0 for O(log n) or O(1), 1 for O(n)), and reset_map's cost.
- ``reset``: on the real back-end process, a guest of 1 to 128 GiB (sparse
  memfd) mapped through a vIOMMU in 2 MiB entries, then the time of a device
  reset that keeps the mappings (IOTLB persistence), of one that drops them
  (a stock front-end), and of RESET_MAP, against the mapped size, each with its
  fitted exponent: the persistent reset must stay flat.
- ``share``: on the real back-end process, 4 KiB random reads at queue depth
  32 without an IOMMU and behind one (every buffer translated), CPU per request
  of each, and translation's share of a request two ways: the difference of
  the two, and translations per request times the measured lookup cost.

    .venv/bin/python scripts/bench_iotlb.py [--max 1000000] [--max-gib 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pyvhost_user.control.client import ControlClient
from pyvhost_user.frontend import BlkDriver
from pyvhost_user.frontend.blk_load import BlkLoad, Pattern, stamp_image
from pyvhost_user.frontend.guest_ram import GuestRam
from pyvhost_user.frontend.iommu import LinearIommu
from pyvhost_user.launch.backends import start_backend
from pyvhost_user.launch.process import tree_cpu_seconds
from pyvhost_user.memory import GuestMemory, map_region
from pyvhost_user.memory.iotlb import PERM_READ, PERM_WRITE, DefaultMapping, Iotlb

GiB = 1 << 30
MiB = 1 << 20

PAGE = 4096
UVA = 0x7F00_0000_0000


def fitted_exponent(sizes: list[int], per_op: list[float]) -> float:
    xs = [math.log(n) for n in sizes]
    ys = [math.log(t) for t in per_op]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure(n: int, memory: GuestMemory, probes: int) -> dict[str, float]:
    # Timed with the cyclic GC off, as timeit does: a full collection over a
    # million entries lands on whichever operation triggers it (the back-end
    # pays those too, but they are not the table's cost per operation).
    gc.collect()
    gc.disable()
    try:
        return _measure(n, memory, probes)
    finally:
        gc.enable()


def _measure(n: int, memory: GuestMemory, probes: int) -> dict[str, float]:
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


def part_ops(args: argparse.Namespace, out: dict) -> None:
    fd = os.memfd_create("bench-iotlb", os.MFD_ALLOW_SEALING)
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
    print("fitted growth exponent (0 = flat, 1 = linear; target: O(log n), i.e. ~0): "
          + ", ".join(f"{op} {e:.2f}" for op, e in exponents.items()))
    out["ops"] = {"rows": rows, "exponents": exponents}


def part_reset(args: argparse.Namespace, workdir: Path, out: dict) -> None:
    """Device reset (kept / dropped) and RESET_MAP against the mapped size."""
    image = workdir / "reset.img"
    image.write_bytes(bytes(MiB))
    control = workdir / "reset-control.sock"
    backend = start_backend("pyvhost", image, workdir / "reset.sock",
                            extra_args=("--log-level", "warning", "--control-socket", str(control)))
    sizes = [g for g in (1, 2, 4, 8, 16, 32, 64, 128) if g <= args.max_gib]
    rows: dict[int, dict[str, float]] = {}
    print(f"\n{'mapped GiB':>10} {'entries':>8} {'map s':>7} {'persistent reset ms':>20} "
          f"{'dropping reset ms':>18} {'reset_map ms':>13}")
    try:
        for gib in sizes:
            row: dict[str, float] = {}
            for persist in (True, False):
                ram = GuestRam([(0, gib * GiB)], name=f"bench-iotlb-{gib}g")
                iommu = LinearIommu(ram, chunk=2 * MiB)
                started = time.perf_counter()
                driver = BlkDriver.connect(backend.socket_path, ram=ram, iommu=iommu, premap=True,
                                           extension=True, persist=persist, timeout=600)
                map_s = time.perf_counter() - started  # start-up, nearly all of it the UPDATEs
                fe = driver.frontend
                try:
                    if persist and not fe.persist:
                        raise SystemExit("the back-end refused IOTLB persistence")
                    with ControlClient(control) as c:
                        before = c.execute("query-address-spaces")[0]["entries"]
                    started = time.perf_counter()
                    fe.reset_device(sync=True)
                    reset_ms = (time.perf_counter() - started) * 1000
                    with ControlClient(control) as c:
                        after = c.execute("query-address-spaces")[0]["entries"]
                    if persist:
                        if after != before:
                            raise SystemExit(f"{gib} GiB: the persistent reset dropped "
                                             f"{before - after} of {before} entries")
                        row.update(entries=before, map_s=map_s, persistent_reset_ms=reset_ms)
                        started = time.perf_counter()
                        fe.reset_map(0)
                        row["reset_map_ms"] = (time.perf_counter() - started) * 1000
                    else:
                        if after != 0:
                            raise SystemExit(f"{gib} GiB: a stock reset kept {after} entries")
                        row["dropping_reset_ms"] = reset_ms
                finally:
                    driver.close()
                    ram.close()
            rows[gib] = row
            print(f"{gib:>10} {int(row['entries']):>8} {row['map_s']:>7.2f} "
                  f"{row['persistent_reset_ms']:>20.3f} {row['dropping_reset_ms']:>18.3f} "
                  f"{row['reset_map_ms']:>13.3f}", flush=True)
    finally:
        backend.stop()
    exponents = {
        key: fitted_exponent(sizes, [rows[g][key] for g in sizes])
        for key in ("persistent_reset_ms", "dropping_reset_ms", "reset_map_ms")
    }
    print("fitted growth exponent against mapped size (target: persistent reset flat, ~0): "
          + ", ".join(f"{k.removesuffix('_ms')} {e:.2f}" for k, e in exponents.items()))
    out["reset"] = {"entry_bytes": 2 * MiB, "rows": rows, "exponents": exponents}


def part_share(args: argparse.Namespace, workdir: Path, out: dict) -> None:
    """Translation's share of a 4 KiB read's back-end CPU time."""
    image = workdir / "share.img"
    stamp_image(image, 64 * MiB)
    control = workdir / "share-control.sock"
    backend = start_backend("pyvhost", image, workdir / "share.sock",
                            extra_args=("--log-level", "warning", "--control-socket", str(control)))
    result: dict[str, float] = {}
    try:
        for mode in ("direct", "iommu"):
            ram = GuestRam([(0, args.share_ram_mib * MiB)], name="bench-share")
            iommu = LinearIommu(ram, chunk=4096) if mode == "iommu" else None
            with BlkDriver.connect(backend.socket_path, ram=ram, iommu=iommu, premap=iommu is not None,
                                   queue_size=256, timeout=600) as driver:
                load = BlkLoad(driver, Pattern(4096, False, False), depth=32)
                load.run(ios=2000)
                with ControlClient(control) as c:
                    t0 = c.execute("query-stats").get("iotlb_translations", 0)
                    entries = c.execute("query-address-spaces")[0]["entries"]
                cpu0 = tree_cpu_seconds(backend.pid)
                r = load.run(args.seconds)
                cpu = tree_cpu_seconds(backend.pid) - cpu0
                with ControlClient(control) as c:
                    t1 = c.execute("query-stats").get("iotlb_translations", 0)
            ram.close()
            result[f"{mode}_cpu_us_per_io"] = cpu / r.ios * 1e6
            result[f"{mode}_iops"] = r.iops
            if mode == "iommu":
                result["entries"] = entries
                result["translations_per_io"] = (t1 - t0) / r.ios
            print(f"share: {mode:6} {r.iops:8.0f} IOPS {cpu / r.ios * 1e6:6.2f} us CPU per request"
                  + (f", {entries} IOTLB entries, {(t1 - t0) / r.ios:.1f} translations per request"
                     if mode == "iommu" else ""), flush=True)
    finally:
        backend.stop()
    # The lookup cost at this table size, measured in process like the ops part.
    fd = os.memfd_create("bench-iotlb", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    memory = GuestMemory()
    memory.add(map_region(fd, 0, 1 << 20, UVA, 0))
    os.close(fd)
    lookup_us = measure(int(result["entries"]), memory, args.probes)["lookup"] * 1e6
    per_io = result["iommu_cpu_us_per_io"]
    by_difference = (per_io - result["direct_cpu_us_per_io"]) / per_io
    worst = result["translations_per_io"] * lookup_us / per_io
    result.update(lookup_us=lookup_us, share_by_difference=by_difference,
                  share_if_every_lookup_missed_the_caches=worst)
    print(f"translation share of a request: {by_difference:.1%} measured (CPU with the IOMMU "
          f"minus without; target <= 10%: {'meets' if by_difference <= 0.10 else 'MISSES'})")
    print(f"  if no translation hit a cache: {worst:.1%} ({result['translations_per_io']:.1f} "
          f"table look-ups x {lookup_us:.2f} us at {int(result['entries'])} entries)")
    out["share"] = result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="ops,reset,share", help="comma-separated: ops,reset,share")
    parser.add_argument("--max", type=int, default=1_000_000, help="ops: largest table (entries)")
    parser.add_argument("--probes", type=int, default=20_000)
    parser.add_argument("--max-gib", type=int, default=128, help="reset: largest mapped guest (GiB)")
    parser.add_argument("--share-ram-mib", type=int, default=256,
                        help="share: guest RAM mapped in 4 KiB entries (default 256: 65536 entries)")
    parser.add_argument("--seconds", type=float, default=3.0, help="share: per measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"ops", "reset", "share"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    out: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="pyvhost-bench-iotlb-"))
    try:
        if "ops" in parts:
            part_ops(args, out)
        if "reset" in parts:
            part_reset(args, workdir, out)
        if "share" in parts:
            part_share(args, workdir, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"\nbench: results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
