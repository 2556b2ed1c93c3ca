#!/usr/bin/env python3
"""Migration-flow lab: device downtime per phase, by guest size, for three ways to map.

Reproduces, on one machine and without a VM, the story behind the seed
(Linux vDPA's ``.reset_map`` and IOTLB persistence): mapping guest memory for
DMA is expensive on hardware (pinning: about 0.16 s/GiB), and whether it
happens inside the migration downtime decides how long the guest stands still.

The reference front-end plays both VMMs. Guest RAM is one sparse memfd of the
guest's size (nothing allocated: 128 GiB costs no RAM), shared by the source
and the destination as migrated RAM would be; rings and buffers are IOVAs
(ACCESS_PLATFORM, our address-space extension), mapped in 1 GiB IOTLB updates.
The destination back-end runs with ``--map-cost simulated`` so that each
update costs what pinning it would; the source's mapping is not measured.

Flows, each at every size:

* legacy: the destination maps before switch-over, but the device reset at
  switch-over drops the mappings (no IOTLB persistence), so they are mapped
  again inside the downtime;
* persist: the same, with IOTLB persistence negotiated: the reset keeps them;
* early-map: the destination resets its device and maps before switch-over;
  nothing is left to do about mappings in the downtime.

Downtime phases (what the VMMs do after the source's guest stops): stop (the
source's ring: SET_VRING_ENABLE 0, GET_VRING_BASE, which finishes the requests
in flight), device reset (destination, RESET_DEVICE), map (destination IOTLB
updates), ring restart (SET_VRING_NUM/BASE/ADDR/KICK/ENABLE, DRIVER_OK), first
I/O (a read through the destination, checked against what the source wrote).

Writes to OUT: results.json, downtime.svg (downtime vs guest size per flow),
trace.json (a Chrome trace event file for Perfetto's UI: both back-ends' flight
recorders and the VMM's phases on one time line) and sequence.mmd (a Mermaid
sequence diagram of the largest legacy run at the destination).

    .venv/bin/python scripts/migration_lab.py [--sizes 1,2,4,8,16,32,64,128] [--rate 0.16]
        [--out lab-results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyvhost_user.control.client import ControlClient
from pyvhost_user.frontend import BlkDriver, Frontend, GuestRam, LinearIommu
from pyvhost_user.frontend.blk import BLK_CONFIG_SIZE, BlkRequest
from pyvhost_user.launch.backends import start_backend
from pyvhost_user.memory.map_cost import PUBLISHED_SECONDS_PER_GIB
from pyvhost_user.recorder import FlightRecorder, chrome_trace, merge_chrome_traces
from pyvhost_user.recorder.chrome_trace import events_from_chrome, write_chrome_trace
from pyvhost_user.recorder.sequence_diagram import mermaid_sequence

GiB = 1 << 30
SECTOR = 512
FLOWS = ("legacy", "persist", "early-map")
PHASES = ("stop", "device reset", "map", "ring restart", "first I/O")
STATUS_FEATURES_OK = 0x0B  # ACKNOWLEDGE | DRIVER | FEATURES_OK
STATUS_DRIVER_OK = 0x0F
IN_FLIGHT_AT_STOP = 8


class LabFailed(Exception):
    pass


@dataclass
class Run:
    flow: str
    size_gib: int
    phases_ms: dict[str, float] = field(default_factory=dict)
    downtime_ms: float = 0.0
    premap_s: float = 0.0  # mapping before switch-over (outside the downtime)
    updates_in_downtime: int = 0
    map_cost_s: float = 0.0  # the destination back-end's own account (query-stats)
    in_flight_at_stop: int = 0


class Progress:
    """One line per step, with a bar and the elapsed time; redrawn in place on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stdout.isatty()

    def step(self, text: str) -> None:
        filled = 30 * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done:>2}/{self.total} "
                f"{time.monotonic() - self.started:6.1f} s  {text}")
        if self.tty:
            print("\r" + line.ljust(110)[:110], end="", flush=True)
        else:
            print(line, flush=True)

    def advance(self, text: str) -> None:
        self.done += 1
        self.step(text)
        if self.tty:
            print(flush=True)


class Lab:
    def __init__(self, workdir: Path, rate: float) -> None:
        self.workdir = workdir
        self.image = workdir / "disk.img"
        self.image.write_bytes(os.urandom(4 << 20))
        self.vmm = FlightRecorder(process="VMM (reference front-end)")
        common = ("--num-asids", "2", "--asid-default", "empty")
        self.source = start_backend(
            "pyvhost", self.image, workdir / "src.sock", log_path=workdir / "src.log",
            extra_args=(*common, "--control-socket", str(workdir / "src.ctl")))
        self.dest = start_backend(
            "pyvhost", self.image, workdir / "dst.sock", log_path=workdir / "dst.log",
            extra_args=(*common, "--map-cost", "simulated", "--map-cost-rate", str(rate),
                        "--control-socket", str(workdir / "dst.ctl")))

    def close(self) -> dict[str, int]:
        return {"source": self.source.stop(), "destination": self.dest.stop()}

    def stats(self, which: str) -> dict:
        with ControlClient(str(self.workdir / f"{which}.ctl")) as client:
            return client.execute("query-stats")

    def trace(self, which: str) -> dict:
        with ControlClient(str(self.workdir / f"{which}.ctl"), timeout=60) as client:
            return client.execute("query-flight-recorder", {"format": "chrome"})

    def phase(self, run: Run, name: str, fn):
        """Time one downtime phase (VMM clock) and record it as a span."""
        start = time.monotonic_ns()
        result = fn()
        end = time.monotonic_ns()
        run.phases_ms[name] = (end - start) / 1e6
        self.vmm.complete("vmm", f"downtime: {name}", start, end, flow=run.flow,
                          size_gib=run.size_gib)
        return result

    def run(self, flow: str, size_gib: int, progress: Progress) -> Run:
        run = Run(flow, size_gib)
        label = f"{flow:9} {size_gib:>3} GiB"
        ram = GuestRam([(0, size_gib * GiB)], name=f"lab-{size_gib}g")
        iommu = LinearIommu(ram, chunk=GiB)
        src = dst = dst_fe = None
        try:
            with self.vmm.span("vmm", "source up", flow=flow, size_gib=size_gib):
                progress.step(f"{label}: source VMM starts and maps")
                src = BlkDriver.connect(self.source.socket_path, ram=ram, iommu=iommu,
                                        premap=True, extension=True, persist=True,
                                        timeout=600)
                tag = f"{flow}:{size_gib}:".encode()
                pattern = (tag * (65536 // len(tag) + 1))[:65536]
                src.write(0, pattern)
            persist = flow == "persist"
            progress.step(f"{label}: destination VMM connects and maps before switch-over")
            dst_fe = Frontend.connect(self.dest.socket_path, ram=ram, iommu=iommu, premap=True,
                                      extension=True, persist=persist, timeout=600)
            with self.vmm.span("vmm", "destination set-up before switch-over", flow=flow,
                               size_gib=size_gib):
                dst_fe.handshake(num_queues=1, config_size=BLK_CONFIG_SIZE)
                if persist and not dst_fe.persist:
                    raise LabFailed("the destination back-end refused IOTLB persistence")
                features = src.frontend.acked_features
                dst_fe.set_features(features)
                dst_fe.set_status(STATUS_FEATURES_OK)
                dst_fe.sync_memory()
                if flow == "early-map":
                    # The device's reset happens now, not at switch-over.
                    dst_fe.reset_device(sync=True)
                started = time.perf_counter()
                dst_fe.premap_iommu()
                run.premap_s = time.perf_counter() - started
            cost_before = self.stats("dst").get("map_cost_seconds", 0.0)

            # -- switch-over: the guest is stopped from here to the first I/O ------------
            tickets = src.submit([BlkRequest.read(8 + 8 * i, 4096)
                                  for i in range(IN_FLIGHT_AT_STOP)])
            progress.step(f"{label}: switch-over")
            base = self.phase(run, "stop", lambda: src.frontend.stop_queue(0))
            run.in_flight_at_stop = len(tickets)
            sent_before = dst_fe.iotlb_messages_sent
            if flow == "early-map":
                run.phases_ms["device reset"] = 0.0
            else:
                self.phase(run, "device reset", lambda: dst_fe.reset_device(sync=True))
            self.phase(run, "map", dst_fe.premap_iommu)
            run.updates_in_downtime = dst_fe.iotlb_messages_sent - sent_before
            # The guest driver goes on as it was; the device under it moves. What the
            # source had not taken from the ring at GET_VRING_BASE, the destination serves.
            src_fe = src.frontend
            ring = src_fe.queue(0).ring
            src_fe.queue(0).ring = None

            def restart() -> None:
                dst_fe.queue(0).ring = ring
                dst_fe.start_queue(0, base=base)
                dst_fe.set_status(STATUS_DRIVER_OK)

            self.phase(run, "ring restart", restart)
            src.frontend, dst = dst_fe, src
            src = None
            src_fe.close()
            first = self.phase(run, "first I/O", lambda: dst.read(0, len(pattern)))
            if first != pattern:
                raise LabFailed(f"{label}: the destination read other data than the source wrote")
            run.downtime_ms = sum(run.phases_ms.values())
            # -- after switch-over: every request in flight at the stop completed ------------
            for completion in dst.wait(tickets, timeout=10):
                completion.check()
            run.map_cost_s = self.stats("dst").get("map_cost_seconds", 0.0) - cost_before
            if flow == "legacy" and run.updates_in_downtime == 0:
                raise LabFailed(f"{label}: nothing was mapped again after the reset")
            if flow != "legacy" and run.updates_in_downtime:
                raise LabFailed(f"{label}: {run.updates_in_downtime} updates inside the downtime")
        finally:
            if dst is not None:
                dst.close()
            elif dst_fe is not None:
                dst_fe.close()
            if src is not None:
                src.close()
            ram.close()
        progress.advance(f"{label}: downtime {run.downtime_ms:9.1f} ms "
                         f"(map {run.phases_ms['map']:8.1f} ms, {run.updates_in_downtime} "
                         "updates)")
        return run


# -- report ---------------------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    head = ["flow", "GiB"] + list(PHASES) + ["downtime", "mapped before"]
    rows = [[r.flow, str(r.size_gib)] + [f"{r.phases_ms.get(p, 0.0):.1f}" for p in PHASES]
            + [f"{r.downtime_ms:.1f}", f"{r.premap_s * 1000:.0f}"] for r in runs]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "(milliseconds)\n" + "\n".join(lines)


def slope_ms_per_gib(runs: list[Run]) -> float:
    """Least-squares slope of downtime against guest size."""
    xs = [r.size_gib for r in runs]
    ys = [r.downtime_ms for r in runs]
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


COLOURS = {"legacy": "#d62728", "persist": "#1f77b4", "early-map": "#2ca02c"}


def svg_plot(runs: list[Run], rate: float) -> str:
    """Downtime (s) against guest size (GiB, linear axes: legacy is a straight line)."""
    width, height, left, right, top, bottom = 720, 420, 70, 170, 50, 50
    sizes = sorted({r.size_gib for r in runs})
    ymax = (max(r.downtime_ms for r in runs) / 1000 or 1.0) * 1.1
    xmax = sizes[-1]

    def x(size: float) -> float:
        return left + size / xmax * (width - left - right)

    def y(seconds: float) -> float:
        return top + (1 - seconds / ymax) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">Device downtime '
           f'at switch-over vs guest size (map cost {rate} s/GiB)</text>',
           f'<line x1="{left}" y1="{y(0)}" x2="{width - right}" y2="{y(0)}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y(0)}" stroke="black"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">guest '
           'size (GiB)</text>',
           f'<text x="15" y="{(top + height - bottom) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 15 {(top + height - bottom) / 2})">downtime (s)</text>']
    last_label = -1e9
    for size in [0, *sizes]:
        out.append(f'<line x1="{x(size)}" y1="{y(0)}" x2="{x(size)}" y2="{y(0) + 5}" '
                   'stroke="black"/>')
        if x(size) - last_label >= 28:  # small sizes crowd the origin: label what fits
            out.append(f'<text x="{x(size)}" y="{y(0) + 18}" text-anchor="middle">{size}</text>')
            last_label = x(size)
    for i in range(6):
        value = ymax * i / 5
        out.append(f'<line x1="{left - 5}" y1="{y(value)}" x2="{width - right}" y2="{y(value)}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y(value) + 4}" text-anchor="end">{value:.1f}</text>')
    for n, flow in enumerate(FLOWS):
        points = sorted((r.size_gib, r.downtime_ms / 1000) for r in runs if r.flow == flow)
        if not points:
            continue
        colour = COLOURS[flow]
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        dash = ' stroke-dasharray="6 4"' if flow == "early-map" else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"'
                   f'{dash}/>')
        out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>'
                for s, v in points]
        ly = top + 20 + 36 * n
        low, high = min(v for _, v in points), max(v for _, v in points)
        out.append(f'<line x1="{width - right + 15}" y1="{ly}" x2="{width - right + 40}" '
                   f'y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{width - right + 45}" y="{ly + 4}">{flow}</text>')
        out.append(f'<text x="{width - right + 45}" y="{ly + 18}" font-size="10">'
                   f'{_ms(low)} .. {_ms(high)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


def write_outputs(lab: Lab, runs: list[Run], out: Path, rate: float,
                  windows: dict[tuple[str, int], tuple[int, int]]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "plot": out / "downtime.svg",
             "trace": out / "trace.json", "sequence": out / "sequence.mmd"}
    paths["results"].write_text(json.dumps(
        {"map_cost_seconds_per_gib": rate, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    paths["plot"].write_text(svg_plot(runs, rate))
    src_trace, dst_trace = lab.trace("src"), lab.trace("dst")
    vmm_trace = chrome_trace(lab.vmm.events(), process="VMM (reference front-end)")
    for trace, name in ((src_trace, "source back-end"), (dst_trace, "destination back-end")):
        for event in trace["traceEvents"]:
            if event.get("name") == "process_name":
                event["args"]["name"] = name
    write_chrome_trace(merge_chrome_traces([vmm_trace, src_trace, dst_trace]), paths["trace"])
    legacy = [r for r in runs if r.flow == "legacy"]
    if legacy:
        biggest = max(legacy, key=lambda r: r.size_gib)
        start, end = windows[(biggest.flow, biggest.size_gib)]
        events = [e for e in events_from_chrome(dst_trace) + lab.vmm.events()
                  if start <= e.ts_ns <= end]
        events.sort(key=lambda e: e.ts_ns)
        paths["sequence"].write_text(mermaid_sequence(
            events, title=f"legacy flow, {biggest.size_gib} GiB guest, destination"))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64,128",
                        help="guest sizes in GiB, comma-separated (default 1..128)")
    parser.add_argument("--rate", type=float, default=PUBLISHED_SECONDS_PER_GIB,
                        help=f"map cost, s/GiB (default {PUBLISHED_SECONDS_PER_GIB}, published)")
    parser.add_argument("--flows", default=",".join(FLOWS))
    parser.add_argument("--out", default="lab-results", help="output directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    flows = [f for f in args.flows.split(",") if f]
    if not sizes or any(s < 1 for s in sizes) or not set(flows) <= set(FLOWS):
        parser.error(f"--sizes: positive GiB; --flows: among {', '.join(FLOWS)}")
    workdir = Path(tempfile.mkdtemp(prefix="pvu-lab-"))
    progress = Progress(len(sizes) * len(flows))
    print(f"migration lab: flows {', '.join(flows)}; guest sizes {sizes} GiB; map cost "
          f"{args.rate} s/GiB at the destination; work dir {workdir}", flush=True)
    ok = False
    lab = Lab(workdir, args.rate)
    runs: list[Run] = []
    windows: dict[tuple[str, int], tuple[int, int]] = {}
    try:
        for flow in flows:
            for size in sizes:
                start = time.monotonic_ns()
                runs.append(lab.run(flow, size, progress))
                windows[(flow, size)] = (start, time.monotonic_ns())
        print()
        print(table(runs))
        paths = write_outputs(lab, runs, Path(args.out), args.rate, windows)
        print()
        for flow in flows:
            mine = [r for r in runs if r.flow == flow]
            print(f"{flow:9}: downtime grows {slope_ms_per_gib(mine):8.2f} ms per GiB "
                  f"({min(r.downtime_ms for r in mine):.1f} .. "
                  f"{max(r.downtime_ms for r in mine):.1f} ms)")
        biggest = max(sizes)
        by = {(r.flow, r.size_gib): r for r in runs}
        for other in ("persist", "early-map"):
            if ("legacy", biggest) in by and (other, biggest) in by:
                ratio = by[("legacy", biggest)].downtime_ms / by[(other, biggest)].downtime_ms
                print(f"{biggest} GiB: legacy / {other} downtime = {ratio:.1f}x")
        print()
        for name, path in paths.items():
            print(f"{name:8} {path}")
        ok = True
    except Exception as exc:
        print(f"\nmigration lab FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        for log in ("src.log", "dst.log"):
            path = workdir / log
            if path.exists():
                print(f"--- {log} (tail)\n" + path.read_text(errors="replace")[-3000:],
                      file=sys.stderr)
    finally:
        codes = lab.close()
        if any(codes.values()):
            print(f"back-end exit codes: {codes}", file=sys.stderr)
            ok = False
        if args.keep or not ok:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
