#!/usr/bin/env python3
"""Side-by-side block benchmark: pyvhost-user against qemu-storage-daemon.

Both back-ends serve the same image, driven by the same reference front-end
in the same run; results are printed as a table with ratios (ours / theirs)
and optionally written as JSON. These are front-end-bound numbers (the
front-end is Python too): compare ratios, not absolute figures.

    .venv/bin/python scripts/bench_blk.py [--size-mib 256] [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyvhost_user.frontend import BlkDriver, BlkRequest
from pyvhost_user.frontend.blk import SECTOR_SIZE
from pyvhost_user.frontend.guest_ram import GuestRam
from pyvhost_user.launch.backends import start_backend

MiB = 1 << 20


@dataclass
class Workload:
    name: str
    block: int
    write: bool
    sequential: bool
    depth: int
    queues: int


WORKLOADS = [
    Workload("seq-read-1M", MiB, False, True, 4, 1),
    Workload("seq-write-1M", MiB, True, True, 4, 1),
    Workload("rand-read-4k-qd1", 4096, False, False, 1, 1),
    Workload("rand-read-4k-qd32", 4096, False, False, 32, 1),
    Workload("rand-write-4k-qd32", 4096, True, False, 32, 1),
    Workload("rand-read-4k-qd32-4q", 4096, False, False, 32, 4),
]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run_workload(driver: BlkDriver, w: Workload, size: int, seconds: float, pid: int) -> dict:
    rng = random.Random(7)
    blocks = size // w.block
    payload = os.urandom(w.block)
    done_bytes = done_ios = 0
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    position = 0
    while time.perf_counter() - t0 < seconds:
        batch = []
        for i in range(w.depth * w.queues * 4):
            index = position % blocks if w.sequential else rng.randrange(blocks)
            position += 1
            sector = index * w.block // SECTOR_SIZE
            queue = i % w.queues
            batch.append(
                BlkRequest.write(sector, payload, queue=queue)
                if w.write
                else BlkRequest.read(sector, w.block, queue=queue)
            )
        driver.run(batch, depth=w.depth)
        done_ios += len(batch)
        done_bytes += len(batch) * w.block
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    return {
        "MiB/s": done_bytes / MiB / elapsed,
        "IOPS": done_ios / elapsed,
        "backend_cpu_us_per_io": cpu / done_ios * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pyvhost-bench-"))
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    size = args.size_mib * MiB
    results: dict[str, dict[str, dict]] = {}
    try:
        for kind in ("pyvhost", "qsd"):
            results[kind] = {}
            for w in WORKLOADS:
                backend = start_backend(kind, image, workdir / f"{kind}.sock", num_queues=4,
                                        extra_args=("--log-level", "warning") if kind == "pyvhost" else ())
                try:
                    layout = ((0, 64 * MiB), (64 * MiB, 64 * MiB))
                    with GuestRam(layout) as ram, BlkDriver.connect(
                        backend.socket_path, ram=ram, num_queues=w.queues, queue_size=256
                    ) as driver:
                        results[kind][w.name] = run_workload(driver, w, size, args.seconds, backend.pid)
                finally:
                    backend.stop()
                r = results[kind][w.name]
                print(f"bench: {kind:8} {w.name:22} {r['MiB/s']:9.1f} MiB/s {r['IOPS']:9.0f} IOPS "
                      f"{r['backend_cpu_us_per_io']:7.1f} us CPU/IO", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'workload':24}{'pyvhost':>14}{'qsd':>14}{'ratio':>8}   CPU/IO ours vs qsd")
    for w in WORKLOADS:
        ours, theirs = results["pyvhost"][w.name], results["qsd"][w.name]
        unit = "MiB/s" if w.block >= MiB else "IOPS"
        print(f"{w.name:24}{ours[unit]:>10.1f} {unit:5}{theirs[unit]:>8.1f} {unit:5}"
              f"{ours[unit] / theirs[unit]:>6.2f}x   "
              f"{ours['backend_cpu_us_per_io']:.0f} us vs {theirs['backend_cpu_us_per_io']:.0f} us")
    if args.json:
        args.json.write_text(json.dumps({"size_mib": args.size_mib, "results": results}, indent=2))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nfront-end CPU: {usage.ru_utime + usage.ru_stime:.1f} s (the front-end is Python too: "
          "absolute figures are front-end-bound; compare ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
