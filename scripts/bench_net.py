#!/usr/bin/env python3
"""Frames per second and Gbit/s between two reference front-ends through the switch.

    PYTHONPATH=backend .venv/bin/python scripts/bench_net.py [--frames 20000] [--json out.json]

Starts ``vhost-user-net-switch`` and two ``vhost-user-net`` back-ends (separate
processes), connects a reference front-end (frontend/net.py) to each, and
sends frames of each size from A to B in windows of ``--window`` frames (a
window is sent, then received whole, so B's RX ring never runs dry and no
frame is dropped). The rate counts frames that arrived, checked by count and
by the sequence number in each. Gbit/s counts Ethernet frame bytes (no
preamble, FCS or gap). The front-ends are Python too: this measures the
whole Python path, both sides.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))

from pyvhost_user.frontend.net import NetDriver  # noqa: E402
from pyvhost_user.launch.net import start_net_backend, start_switch  # noqa: E402

SIZES = (64, 1500)


def run_size(a: NetDriver, b: NetDriver, size: int, frames: int, window: int) -> dict[str, float]:
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
    return {"frame_bytes": size, "frames": received, "seconds": round(seconds, 4),
            "frames_per_second": round(received / seconds),
            "gbit_per_second": round(received * size * 8 / seconds / 1e9, 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20000, help="frames per size")
    p.add_argument("--window", type=int, default=128, help="frames in flight (<= RX ring size)")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
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
        finally:
            a.close()
            b.close()
    finally:
        for proc in (*backends, switch):
            proc.stop()
    print(f"{'frame bytes':>11} {'frames':>8} {'seconds':>8} {'frames/s':>10} {'Gbit/s':>8}")
    for r in results:
        print(f"{r['frame_bytes']:>11} {r['frames']:>8} {r['seconds']:>8.3f} "
              f"{r['frames_per_second']:>10} {r['gbit_per_second']:>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "net switch A->B", "window": args.window,
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
