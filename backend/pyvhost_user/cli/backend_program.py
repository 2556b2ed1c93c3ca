"""What every back-end program shares (vhost-user-blk, vhost-user-net).

QEMU's vhost-user.rst sets the conventions of a back-end program: where it
listens (``--socket-path`` or an inherited ``--fd``), ``--print-capabilities``,
an early non-zero exit when it cannot start, a clean end on SIGTERM. The
options of the layers under the device (address spaces, sealing, the flight
recorder, the control socket, the socket's permissions) are the same for every
device too. A program adds its device's options, builds its device, and hands
it to ``serve``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Mapping
from typing import Any

from ..devices.base import Device
from ..memory.iotlb import DefaultMapping
from ..memory.peer_fd import SealPolicy
from ..recorder import FlightRecorder, chrome_trace, mermaid_sequence
from ..recorder.chrome_trace import write_chrome_trace
from ..recorder.flight_recorder import DEFAULT_CAPACITY
from ..server import BackendServer
from ..server.control_target import BackendControl
from ..server.options import BackendOptions, IotlbPersist

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


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with where to listen; the device's options come next, then
    ``add_common_arguments``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--fd", type=int, metavar="FDNUM", help="use this inherited socket fd")
    return p


def add_common_arguments(p: argparse.ArgumentParser) -> None:
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


def print_capabilities(capabilities: Mapping[str, Any]) -> int:
    json.dump(capabilities, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def start_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """``BackendOptions`` keywords from the common arguments (the caller adds its own)."""
    return {
        "num_asids": args.num_asids,
        "asid_default": DefaultMapping(args.asid_default),
        "iotlb_persist": IotlbPersist(args.iotlb_persist),
        "memory_seal": SealPolicy(args.memory_seal),
    }


def serve(prog: str, device: Device, args: argparse.Namespace, stop: StopOnSignal,
          **options: Any) -> int:
    """Listen, serve front-ends until a signal, then clean up; the exit status.

    Owns ``device`` from here: it is closed on every path out. ``stop``: the
    signal handlers, installed by the caller before it set anything up (a
    SIGTERM that comes meanwhile still ends the program cleanly).
    """
    try:
        backend_options = BackendOptions(**common_options(args), **options)
        recorder = FlightRecorder(args.flight_recorder)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        device.close()
        return 1
    if backend_options.iotlb_persist is IotlbPersist.ALWAYS:
        log.warning(
            "--iotlb-persist always: device resets keep IOTLB entries even for a front-end "
            "that never invalidates them on reboot (stock QEMU): stale translations possible"
        )
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
            print(f"{prog}: cannot open the control socket: {exc}", file=sys.stderr)
            device.close()
            return 1
        log.info("control socket on %s", args.control_socket)
    try:
        server = BackendServer(
            device, socket_path=args.socket_path, fd=args.fd, socket_mode=args.socket_mode,
            socket_group=args.socket_group, options=backend_options, recorder=recorder,
        )
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot listen: {exc}", file=sys.stderr)
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
        metrics = getattr(device, "metrics", None)
        if metrics is not None:
            log.info("%s counters: %s", device.capability_type, metrics.snapshot())
        device.close()
        write_traces(recorder, device.describe(), args.trace_out, args.sequence_out)
    log.info("stopped after %d front-end session(s)", server.sessions_served)
    return 0
