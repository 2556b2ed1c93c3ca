#!/usr/bin/env python3
"""Side-by-side block benchmark: pyvhost-user against qemu-storage-daemon.

In one run, on one image and with one front-end (the reference front-end's
fixed-slot load generator, ``frontend/blk_load.py``), every workload is run
on each back-end in turn, and the results are printed side by side with
ratios (ours / qemu-storage-daemon), next to the issue's targets:

- 1 MiB sequential read and write (MiB/s), queue depth 4;
- 4 KiB random read and write (IOPS) at queue depth 1 and 32, on 1 queue and
  on N queues;
- CPU time per I/O of the back-end process (user + system, all threads);
- the front-end's own CPU share: a front-end near 100 % bounds the figure;
- start to listening (ms) and idle RSS (MiB) of each back-end.

Every request is checked (status, used length, and the data: each 4 KiB block
of the image carries its number), so a fast wrong answer fails the run.

    .venv/bin/python scripts/bench_blk.py [--seconds 3] [--queues 4] [--json results.json]
        [--variant 'procs=--queue-workers processes' --variant 'io2=--io-threads 2']

``--variant`` adds configurations of our back-end as columns of their own, so
that threads against processes, or I/O threads, are compared in the same run.

These machines are noisy: compare the ratios, from one run, not absolute
figures across runs. ``--repeat`` runs every cell several times and keeps the
median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pyvhost_user.frontend import BlkDriver
from pyvhost_user.frontend.blk import BLK_DRIVER_FEATURES
from pyvhost_user.frontend.blk_load import BlkLoad, Pattern, stamp_image
from pyvhost_user.frontend.guest_ram import GuestRam
from pyvhost_user.launch.backends import backend_command, start_backend
from pyvhost_user.launch.process import tree_cpu_seconds
from pyvhost_user.wire import VirtioFeature

MiB = 1 << 20
KiB = 1 << 10
RAM_LAYOUT = ((0, 256 * MiB), (256 * MiB, 256 * MiB))  # two regions, as a guest with a hole has


@dataclass(frozen=True)
class Workload:
    name: str
    pattern: Pattern
    depth: int
    queues: int  # 0: the --queues value
    unit: str  # what the row compares: "MiB/s" or "IOPS"
    target: float | None = None  # the minimum ratio, when it sets one


def workloads(queues: int) -> list[Workload]:
    seq_r, seq_w = Pattern(MiB, False, True), Pattern(MiB, True, True)
    rnd_r, rnd_w = Pattern(4 * KiB, False, False), Pattern(4 * KiB, True, False)
    rows = [
        Workload("seq-read-1M-qd4", seq_r, 4, 1, "MiB/s", 1.0),
        Workload("seq-write-1M-qd4", seq_w, 4, 1, "MiB/s", 1.0),
        Workload("rand-read-4k-qd1", rnd_r, 1, 1, "IOPS"),
        Workload("rand-write-4k-qd1", rnd_w, 1, 1, "IOPS"),
        Workload("rand-read-4k-qd32", rnd_r, 32, 1, "IOPS", 0.5),
        Workload("rand-write-4k-qd32", rnd_w, 32, 1, "IOPS"),
    ]
    if queues > 1:
        rows += [
            Workload(f"rand-read-4k-qd32-{queues}q", rnd_r, 32, queues, "IOPS", 1.0),
            Workload(f"rand-write-4k-qd32-{queues}q", rnd_w, 32, queues, "IOPS"),
            Workload(f"seq-read-1M-qd4-{queues}q", seq_r, 4, queues, "MiB/s"),
        ]
    return rows


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def time_to_listening(kind: str, image: Path, sock: Path, queues: int, extra: tuple[str, ...]) -> tuple[float, float]:
    """(ms from exec to a connect that succeeds, idle RSS MiB once listening)."""
    if sock.exists():
        sock.unlink()
    command = backend_command(kind, image, sock, num_queues=queues, extra_args=extra)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = start + 20
        while True:
            # Bounded busy probe: the measurement itself, so no sleeping between tries.
            try:
                probe.connect(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if process.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"{kind} did not listen on {sock}") from None
        elapsed = (time.perf_counter() - start) * 1000
        probe.close()
        return elapsed, rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(10)


def run_cell(kind: str, image: Path, workdir: Path, w: Workload, queues: int, seconds: float,
             extra: tuple[str, ...], driver_features: int = BLK_DRIVER_FEATURES) -> dict:
    nqueues = w.queues or queues
    backend = start_backend(kind, image, workdir / f"{kind}.sock", num_queues=max(queues, 1),
                            extra_args=extra)
    try:
        with GuestRam(RAM_LAYOUT) as ram, BlkDriver.connect(
            backend.socket_path, ram=ram, num_queues=nqueues, queue_size=256,
            driver_features=driver_features,
        ) as driver:
            load = BlkLoad(driver, w.pattern, depth=w.depth)
            load.run(ios=w.depth * nqueues * 4)  # warm-up: page tables, page cache, threads
            cpu0 = tree_cpu_seconds(backend.pid)
            result = load.run(seconds)
            cpu = tree_cpu_seconds(backend.pid) - cpu0
            rss = rss_mib(backend.pid)
    finally:
        backend.stop()
    return {
        "MiB/s": result.mib_per_second,
        "IOPS": result.iops,
        "ios": result.ios,
        "backend_cpu_us_per_io": cpu / result.ios * 1e6,
        "backend_cpu_share": cpu / result.seconds,
        "frontend_cpu_share": result.frontend_cpu_seconds / result.seconds,
        "kicks_per_io": result.kicks / result.ios,
        "wakeups_per_io": result.wakeups / result.ios,
        "busy_rss_mib": rss,
    }


def median_cell(samples: list[dict]) -> dict:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def describe_machine() -> dict:
    qsd = subprocess.run(backend_command("qsd", Path("x"), Path("y"))[:1] + ["--version"],
                         capture_output=True, text=True).stdout.splitlines()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = None
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu_storage_daemon": qsd[0] if qsd else None,
        "commit": commit,
    }


@dataclass(frozen=True)
class Contender:
    """One back-end configuration in the comparison."""

    name: str
    kind: str  # "pyvhost" or "qsd"
    args: tuple[str, ...]


def parse_variant(text: str) -> Contender:
    name, sep, rest = text.partition("=")
    if not sep or not name or name == "qsd":
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=ARGS (NAME not 'qsd')")
    return Contender(name, "pyvhost", ("--log-level", "warning", *rest.split()))


def verdict(value: float, target: float | None, *, below: bool = False) -> str:
    if target is None:
        return ""
    ok = value < target if below else value >= target
    return "meets" if ok else "MISSES"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="image size (default 512)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell (default 3)")
    parser.add_argument("--queues", type=int, default=4, help="N for the N-queue rows (default 4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is kept")
    parser.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                        help="run only these workloads (repeatable)")
    parser.add_argument("--pyvhost-args", default="",
                        help="extra arguments for our back-end, e.g. '--io-threads 2'")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[],
                        metavar="NAME=ARGS",
                        help="also run our back-end with these arguments, as its own column "
                        "(repeatable), e.g. 'procs=--queue-workers processes'")
    parser.add_argument("--no-event-idx", action="store_true",
                        help="the front-end does not negotiate EVENT_IDX (to measure what it saves)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    contenders = [Contender("pyvhost", "pyvhost", ("--log-level", "warning", *args.pyvhost_args.split())),
                  *args.variant, Contender("qsd", "qsd", ())]
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        parser.error(f"contender names must differ: {names}")
    ours = [c for c in contenders if c.kind == "pyvhost"]
    rows = [w for w in workloads(args.queues) if not args.only or w.name in args.only]
    if not rows:
        parser.error(f"--only matched no workload (have: {', '.join(w.name for w in workloads(args.queues))})")
    driver_features = BLK_DRIVER_FEATURES & ~(int(VirtioFeature.EVENT_IDX) if args.no_event_idx else 0)
    workdir = Path(tempfile.mkdtemp(prefix="pyvhost-bench-"))
    image = workdir / "disk.img"
    results: dict[str, dict[str, dict]] = {c.name: {} for c in contenders}
    startup: dict[str, dict[str, float]] = {}
    total = len(rows) * len(contenders) * args.repeat
    done = 0
    began = time.monotonic()
    try:
        print(f"bench: writing a {args.size_mib} MiB stamped image", flush=True)
        stamp_image(image, args.size_mib * MiB)
        for c in contenders:
            times, rsses = [], []
            for _ in range(5):
                ms, rss = time_to_listening(c.kind, image, workdir / "start.sock", args.queues, c.args)
                times.append(ms)
                rsses.append(rss)
            startup[c.name] = {"start_to_listening_ms": statistics.median(times),
                               "idle_rss_mib": statistics.median(rsses)}
            print(f"bench: {c.name:10} start to listening {startup[c.name]['start_to_listening_ms']:6.1f} ms "
                  f"(median of 5), idle RSS {startup[c.name]['idle_rss_mib']:5.1f} MiB", flush=True)
        for w in rows:
            # Every contender back to back on each workload: drift in the machine's
            # load hits all sides of a ratio alike.
            for c in contenders:
                samples = []
                for _ in range(args.repeat):
                    samples.append(run_cell(c.kind, image, workdir, w, args.queues, args.seconds,
                                            c.args, driver_features))
                    done += 1
                r = results[c.name][w.name] = median_cell(samples)
                elapsed = time.monotonic() - began
                print(f"bench: [{done:2}/{total}] {c.name:10} {w.name:26} {r['MiB/s']:9.1f} MiB/s "
                      f"{r['IOPS']:9.0f} IOPS {r['backend_cpu_us_per_io']:7.1f} us CPU/IO "
                      f"(back-end {r['backend_cpu_share']:4.0%}, front-end {r['frontend_cpu_share']:4.0%} "
                      f"of a CPU, {r['kicks_per_io']:.2f} kicks and {r['wakeups_per_io']:.2f} "
                      f"interrupts per I/O)  {elapsed:5.0f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ratios: dict[str, dict[str, float]] = {c.name: {} for c in ours}
    print()
    header = f"{'workload':28}" + "".join(f"{c.name:>17}" for c in contenders)
    header += "".join(f"{c.name + '/qsd':>14}" for c in ours) + f"{'target':>8}  CPU us/IO " + \
        " ".join(c.name for c in contenders)
    print(header)
    for w in rows:
        theirs = results["qsd"][w.name]
        line = f"{w.name:28}" + "".join(f"{results[c.name][w.name][w.unit]:>11.0f} {w.unit:5}"
                                        for c in contenders)
        best = 0.0
        for c in ours:
            ratio = ratios[c.name][w.name] = results[c.name][w.name][w.unit] / theirs[w.unit]
            best = max(best, ratio)
            line += f"{ratio:>13.2f}x"
        line += f"{(f'{w.target:.1f}x' if w.target else ''):>8}  "
        line += " / ".join(f"{results[c.name][w.name]['backend_cpu_us_per_io']:.1f}" for c in contenders)
        notes = [verdict(best, w.target)]
        if any(results[c.name][w.name]["frontend_cpu_share"] > 0.9 for c in contenders):
            notes.append("front-end bound")
        print(line + "  " + " ".join(n for n in notes if n))
    print()
    for c in contenders:
        s = startup[c.name]
        mine = c.kind == "pyvhost"
        print(f"{c.name:10} start to listening {s['start_to_listening_ms']:6.1f} ms"
              + (f" (target < 200 ms: {verdict(s['start_to_listening_ms'], 200, below=True)})" if mine else "")
              + f"   idle RSS {s['idle_rss_mib']:5.1f} MiB"
              + (f" (target < 40 MiB: {verdict(s['idle_rss_mib'], 40, below=True)})" if mine else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "bench_blk",
            "version": 3,
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": describe_machine(),
            "config": {"size_mib": args.size_mib, "seconds": args.seconds, "queues": args.queues,
                       "repeat": args.repeat, "event_idx": not args.no_event_idx,
                       "contenders": [asdict(c) for c in contenders],
                       "workloads": [asdict(w) for w in rows]},
            "startup": startup,
            "results": results,
            "ratios_to_qsd": ratios,
        }, indent=2, default=str))
        print(f"\nbench: results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
