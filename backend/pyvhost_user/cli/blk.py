"""``vhost-user-blk``: the virtio-blk back-end program.

Follows the back-end program conventions of QEMU's vhost-user.rst:
``--socket-path`` or ``--fd``, ``--print-capabilities``, ``--blk-file`` and
``--read-only``; exits non-zero early when it cannot start; ends cleanly on
SIGTERM (and SIGINT); never daemonizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from ..devices.base import DeviceError
from ..devices.blk import BlkDevice
from ..memory.iotlb import DefaultMapping
from ..memory.map_cost import PUBLISHED_SECONDS_PER_GIB, MapCost
from ..memory.peer_fd import SealPolicy
from ..recorder import FlightRecorder, chrome_trace, mermaid_sequence
from ..recorder.chrome_trace import write_chrome_trace
from ..recorder.flight_recorder import DEFAULT_CAPACITY
from ..server import BackendServer
from ..server.control_target import BackendControl
from ..server.options import BackendOptions, IotlbPersist, QueueWorkers

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}

log = logging.getLogger("pyvhost_user")


class StopOnSignal:
    """SIGINT/SIGTERM handlers installed before anything else is set up."""

    def __init__(self) -> None:
        self.server: BackendServer | None = None
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def attach(self, server: BackendServer) -> None:
        self.server = server
        server.route_signals_to_wakeup()
        if self.requested:
            server.request_stop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.requested = True
        if self.server is not None:
            self.server.request_stop()


def write_traces(recorder: FlightRecorder, what: str, chrome: str | None,
                 sequence: str | None) -> None:
    """The flight recorder at exit, as asked (a failure is logged: the exit goes on)."""
    events = recorder.events()
    try:
        if chrome:
            write_chrome_trace(chrome_trace(events, process=f"back-end {what}",
                                            other=recorder.describe()), chrome)
            log.info("flight recorder: %d events written to %s", len(events), chrome)
        if sequence:
            with open(sequence, "w") as f:
                f.write(mermaid_sequence(events, title=what))
            log.info("flight recorder: sequence diagram written to %s", sequence)
    except OSError as exc:
        log.error("cannot write the flight recorder: %s", exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhost-user-blk",
        description="virtio-blk vhost-user back-end (pyvhost-user)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--fd", type=int, metavar="FDNUM", help="use this inherited socket fd")
    p.add_argument(
        "--image", "--blk-file", dest="image", metavar="FILE",
        help="raw image file or block device to serve",
    )
    p.add_argument("--read-only", action="store_true", help="refuse every write")
    p.add_argument("--num-queues", type=int, default=1, metavar="N", help="virtqueues (1..64)")
    p.add_argument("--serial", help="the id GET_ID returns (default: the image's file name)")
    p.add_argument(
        "--print-capabilities", action="store_true",
        help="print the back-end capabilities as JSON and exit",
    )
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="log level (debug includes the protocol trace)",
    )
    p.add_argument(
        "--num-asids", type=int, default=2, metavar="N",
        help="address spaces (ASIDs), each with its own IOTLB (default 2)",
    )
    p.add_argument(
        "--asid-default", choices=[d.value for d in DefaultMapping], default="identity",
        help="default mapping of an ASID for a front-end speaking the address-space "
        "extension: identity (1:1 over guest memory) or empty (every access misses); "
        "a stock front-end with a vIOMMU always gets empty",
    )
    p.add_argument(
        "--iotlb-persist", choices=[p.value for p in IotlbPersist], default="negotiated",
        help="keep IOTLBs across device reset: negotiated (only for a front-end that asks), "
        "always (even for stock QEMU: stale translations possible), never",
    )
    p.add_argument(
        "--memory-seal", choices=[s.value for s in SealPolicy], default="try",
        help="files the front-end sends to be mapped are sealed against shrinking when "
        "the kernel allows it (memfds made sealable, as QEMU's memory-backend-memfd does); "
        "try: map the others with a warning (a front-end truncating one would kill the "
        "back-end with SIGBUS), require: refuse them",
    )
    p.add_argument(
        "--map-cost", choices=[c.value for c in MapCost], default="none",
        help="what mapping guest memory for DMA costs (IOTLB updates; the memory table "
        "without an IOTLB): none, real (populate every page, as pinning does) or simulated "
        "(sleep --map-cost-rate per GiB, nothing allocated)",
    )
    p.add_argument(
        "--io-threads", type=int, default=2, metavar="N",
        help="per ring, N threads serve requests of 64 KiB and more, flushes, discards and "
        "write-zeroes, so that large copies use several CPUs and a slow flush does not hold "
        "the ring (default 2; 0: the ring's worker serves everything)",
    )
    p.add_argument(
        "--queue-workers", choices=[w.value for w in QueueWorkers], default=QueueWorkers.AUTO.value,
        help="where each ring is served: a thread of this process, or a process of its own "
        "forked when the ring starts, so that rings use several CPUs (only without an IOTLB and "
        "outside migration: a ring falls back to a thread then); auto (default): processes "
        "with more than one queue, threads with one",
    )
    p.add_argument(
        "--map-cost-rate", type=float, default=PUBLISHED_SECONDS_PER_GIB, metavar="S_PER_GIB",
        help=f"seconds per GiB for --map-cost simulated (default {PUBLISHED_SECONDS_PER_GIB}, "
        "the published vDPA pinning rate)",
    )
    p.add_argument(
        "--flight-recorder", type=int, default=DEFAULT_CAPACITY, metavar="N",
        help=f"events the flight recorder keeps (default {DEFAULT_CAPACITY}); see "
        "vhost-user-ctl query-flight-recorder",
    )
    p.add_argument(
        "--trace-out", metavar="FILE",
        help="at exit, write the flight recorder as a Chrome trace JSON (opens in Perfetto)",
    )
    p.add_argument(
        "--sequence-out", metavar="FILE",
        help="at exit, write the flight recorder as a Mermaid sequence diagram",
    )
    p.add_argument(
        "--control-socket", metavar="PATH",
        help="operator control socket (JSON, QMP-like; see vhost-user-ctl)",
    )
    p.add_argument(
        "--socket-mode", type=lambda s: int(s, 8), default=0o600, metavar="OCTAL",
        help="permissions of the socket file (default 600: only this user may connect)",
    )
    p.add_argument(
        "--socket-group", metavar="GROUP",
        help="give the socket file to GROUP (with --socket-mode 660 its members may connect)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        json.dump(CAPABILITIES, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.socket_path is None and args.fd is None:
        print("vhost-user-blk: one of --socket-path or --fd is required", file=sys.stderr)
        return 2
    if not args.image:
        print("vhost-user-blk: --image (or --blk-file) is required", file=sys.stderr)
        return 2
    try:
        device = BlkDevice(args.image, read_only=args.read_only, num_queues=args.num_queues)
    except DeviceError as exc:
        print(f"vhost-user-blk: {exc}", file=sys.stderr)
        return 1
    try:
        options = BackendOptions(
            num_asids=args.num_asids,
            asid_default=DefaultMapping(args.asid_default),
            iotlb_persist=IotlbPersist(args.iotlb_persist),
            memory_seal=SealPolicy(args.memory_seal),
            map_cost=MapCost(args.map_cost),
            map_cost_seconds_per_gib=args.map_cost_rate,
            io_threads=args.io_threads,
            queue_workers=QueueWorkers(args.queue_workers),
        )
        recorder = FlightRecorder(args.flight_recorder)
    except ValueError as exc:
        print(f"vhost-user-blk: {exc}", file=sys.stderr)
        device.close()
        return 1
    if options.iotlb_persist is IotlbPersist.ALWAYS:
        log.warning(
            "--iotlb-persist always: device resets keep IOTLB entries even for a front-end "
            "that never invalidates them on reboot (stock QEMU): stale translations possible"
        )
    # Signals first: a SIGTERM that comes while we set up still ends us cleanly.
    stop = StopOnSignal()
    # The control socket before the vhost-user one: once the vhost-user socket
    # exists (what QEMU, libvirt and tests wait for), everything is ready.
    target = BackendControl(None)
    control = None
    if args.control_socket:
        # Imported only when asked for: it is a fifth of the start-up time.
        from ..control.server import ControlServer

        try:
            control = ControlServer(args.control_socket, target)
            control.start()
        except (OSError, ValueError) as exc:
            print(f"vhost-user-blk: cannot open the control socket: {exc}", file=sys.stderr)
            device.close()
            return 1
        log.info("control socket on %s", args.control_socket)
    try:
        server = BackendServer(
            device, socket_path=args.socket_path, fd=args.fd, socket_mode=args.socket_mode,
            socket_group=args.socket_group, options=options, recorder=recorder,
        )
    except (OSError, ValueError) as exc:
        print(f"vhost-user-blk: cannot listen: {exc}", file=sys.stderr)
        if control is not None:
            control.close()
        device.close()
        return 1
    target.server = server
    stop.attach(server)
    log.info("serving %s", device.describe())
    try:
        server.serve_forever()
    finally:
        if control is not None:
            control.close()
        device.close()
        write_traces(recorder, device.describe(), args.trace_out, args.sequence_out)
    log.info("stopped after %d front-end session(s)", server.sessions_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
