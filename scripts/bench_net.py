#!/usr/bin/env python3
"""Frames per second and Gbit/s through the switch: between two reference front-ends,
and between DPDK's testpmd (net_virtio_user) and a reference front-end.

    PYTHONPATH=backend .venv/bin/python scripts/bench_net.py [--frames 20000] [--json out.json]
                                                             [--no-dpdk]

Starts ``vhost-user-net-switch`` and two ``vhost-user-net`` back-ends (separate
processes), connects a reference front-end (frontend/net.py) to each, and
sends frames of each size from A to B in windows of ``--window`` frames (a
window is sent, then received whole, so B's RX ring never runs dry and no
frame is dropped). The rate counts frames that arrived, checked by count and
by the sequence number in each. Gbit/s counts Ethernet frame bytes (no
preamble, FCS or gap). The front-ends are Python too: this measures the
whole Python path, both sides.

With DPDK (unless ``--no-dpdk``), a third back-end on the switch serves
dpdk-testpmd as its front-end (launch/dpdk.py), and two more paths are
measured, one of our Python front-ends fewer on each:
- testpmd txonly -> B: testpmd sends its UDP template as fast as its TX ring
  empties, to B's MAC; the rate counts frames of the size that B's reference
  front-end received (from the first ``start`` to the last frame counted);
  testpmd's TX-dropped (its ring was full) is the back-pressure, not loss.
- A -> testpmd rxonly: A's reference front-end sends, testpmd counts (its
  port's RX-packets, asked until it reaches the number sent).
testpmd's forwarding core busy-polls: on a small machine it takes a CPU from
the Python processes while it runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))

from pyvhost_user.frontend.net import NetDriver  # noqa: E402
from pyvhost_user.launch import dpdk  # noqa: E402
from pyvhost_user.launch.net import start_net_backend, start_switch  # noqa: E402

SIZES = (64, 1500)
TESTPMD_MAC = "52:54:00:00:20:01"


def run_size(a: NetDriver, b: NetDriver, size: int, frames: int, window: int) -> dict:
    dst, src = b.config.mac, a.config.mac
    template = dst + src + b"\x88\xb5"
    payload = bytes(size - len(template) - 4)
    batches = [[template + struct.pack("!I", i) + payload for i in range(start, min(frames, start + window))]
               for start in range(0, frames, window)]
    received = 0
    started = time.perf_counter()
    for batch in batches:
        a.send(batch)
        got = b.receive_frames(len(batch), timeout=30)
        for want, frame in zip(batch, got):
            if frame[14:18] != want[14:18]:
                raise AssertionError(f"frame {struct.unpack('!I', want[14:18])[0]} out of order")
        received += len(got)
    seconds = time.perf_counter() - started
    return _figures("switch A->B", size, received, seconds)


def _figures(path: str, size: int, frames: int, seconds: float, **extra: int) -> dict:
    return {"path": path, "frame_bytes": size, "frames": frames, "seconds": round(seconds, 4),
            "frames_per_second": round(frames / seconds),
            "gbit_per_second": round(frames * size * 8 / seconds / 1e9, 4), **extra}


def run_testpmd_to_us(tp: dpdk.Testpmd, b: NetDriver, size: int, frames: int) -> dict:
    """testpmd txonly -> B: frames of ``size`` counted at B's front-end."""
    tp.set_forward_mode("txonly")
    tp.command(f"set txpkts {size}")
    tp.clear_stats()
    b.poll_received()
    received = stale = 0
    started = time.perf_counter()
    tp.start()
    try:
        while received < frames:
            for frame in b.receive_frames(1, timeout=30):
                if len(frame) == size and frame[12:14] == b"\x08\x00":
                    received += 1
                else:
                    stale += 1  # still in flight from the previous size
        seconds = time.perf_counter() - started
    finally:
        fwd = tp.stop()
    return _figures("testpmd txonly -> B", size, received, seconds,
                    testpmd_tx_packets=fwd.tx_packets, testpmd_tx_ring_full=fwd.tx_dropped,
                    stale_frames_ignored=stale)


def run_us_to_testpmd(tp: dpdk.Testpmd, a: NetDriver, dst: bytes, size: int, frames: int) -> dict:
    """A -> testpmd rxonly: counted by testpmd's port statistics."""
    tp.set_forward_mode("rxonly")
    tp.clear_stats()
    tp.start()
    template = dst + a.config.mac + b"\x88\xb5"
    payload = bytes(size - len(template) - 4)
    batch = [template + struct.pack("!I", i) + payload for i in range(frames)]
    try:
        started = time.perf_counter()
        for start in range(0, frames, 256):
            a.send(batch[start : start + 256])
        a.flush_tx(timeout=60)
        stats = tp.wait_rx_packets(frames, timeout=60)
        seconds = time.perf_counter() - started
    finally:
        tp.stop()
    if stats.rx_bytes != frames * size:
        raise AssertionError(f"testpmd counted {stats.rx_bytes} bytes, not {frames * size}")
    return _figures("A -> testpmd rxonly", size, stats.rx_packets, seconds)


def run_dpdk(workdir: Path, switch_path: Path, a: NetDriver, b: NetDriver, frames: int) -> list:
    dpdk.find_testpmd()
    backend = start_net_backend(workdir / "t.sock", switch=switch_path, mac="52:54:00:00:20:0c",
                                log_level="warning")
    tp = None
    try:
        tp = dpdk.start_testpmd(backend.socket_path, mac=TESTPMD_MAC,
                                peer_mac=_format_mac(b.config.mac),
                                log_path=workdir / "testpmd.log")
        # B's address learnt by the switch: testpmd's frames go to B only, not flooded.
        b.send([a.config.mac + b.config.mac + b"\x88\xb5" + bytes(50)])
        a.receive_frames(1, timeout=30)
        run_testpmd_to_us(tp, b, 64, min(1000, frames))  # warm-up
        results = [run_testpmd_to_us(tp, b, size, frames) for size in SIZES]
        dst = bytes.fromhex(TESTPMD_MAC.replace(":", ""))
        results += [run_us_to_testpmd(tp, a, dst, size, frames) for size in SIZES]
        return results
    finally:
        if tp is not None:
            tp.quit()
        backend.stop()


def _format_mac(mac: bytes) -> str:
    return ":".join(f"{x:02x}" for x in mac)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20000, help="frames per size")
    p.add_argument("--window", type=int, default=128, help="frames in flight (<= RX ring size)")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-dpdk", action="store_true",
                   help="leave out the paths with testpmd (net_virtio_user)")
    args = p.parse_args()
    if not args.no_dpdk:
        try:
            dpdk.find_testpmd()
        except dpdk.TestpmdNotFound as exc:
            print(f"bench_net: {exc} (or use --no-dpdk)", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="pvu-bench-net-"))
    switch = start_switch(workdir / "sw.sock")
    backends = [start_net_backend(workdir / f"{n}.sock", switch=switch.socket_path, mac=mac,
                                  log_level="warning")
                for n, mac in (("a", "52:54:00:00:20:0a"), ("b", "52:54:00:00:20:0b"))]
    results = []
    try:
        a, b = (NetDriver.connect(be.socket_path, queue_size=args.queue_size) for be in backends)
        try:
            run_size(a, b, 64, min(1000, args.frames), args.window)  # warm-up
            for size in SIZES:
                results.append(run_size(a, b, size, args.frames, args.window))
            if not args.no_dpdk:
                results += run_dpdk(workdir, switch.socket_path, a, b, args.frames)
        finally:
            a.close()
            b.close()
    finally:
        for proc in (*backends, switch):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # sockets and logs of this run only
    print(f"{'path':<20} {'frame bytes':>11} {'frames':>8} {'seconds':>8} {'frames/s':>10} "
          f"{'Gbit/s':>8}")
    for r in results:
        print(f"{r['path']:<20} {r['frame_bytes']:>11} {r['frames']:>8} {r['seconds']:>8.3f} "
              f"{r['frames_per_second']:>10} {r['gbit_per_second']:>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "net", "window": args.window,
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
