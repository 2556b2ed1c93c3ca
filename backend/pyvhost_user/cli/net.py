"""``vhost-user-net``: the virtio-net back-end program.

Same conventions as vhost-user-blk (QEMU's vhost-user.rst): ``--socket-path``
or ``--fd``, ``--print-capabilities``; exits non-zero early when it cannot
start; ends cleanly on SIGTERM (and SIGINT); never daemonizes. Frames go to
the built-in switch (``--switch PATH``, see ``vhost-user-net-switch``) or a
tap device (``--tap NAME``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..control.server import ControlServer
from ..devices.base import DeviceError
from ..devices.net import NetDevice
from ..devices.net.constants import MAX_QUEUE_PAIRS
from ..devices.net.device import MAX_MTU, MIN_MTU
from ..devices.net.config import parse_mac
from ..devices.net.port import PacketPort
from ..memory.iotlb import DefaultMapping
from ..memory.peer_fd import SealPolicy
from ..packet import SwitchPort, TapPort
from ..recorder import FlightRecorder
from ..recorder.flight_recorder import DEFAULT_CAPACITY
from ..server import BackendServer
from ..server.control_target import BackendControl
from ..server.options import BackendOptions, IotlbPersist
from .blk import StopOnSignal, write_traces

CAPABILITIES = {"type": "net", "features": ["mac", "mtu", "queue-pairs", "switch", "tap"]}
DEFAULT_MAC = "52:54:00:12:34:56"

log = logging.getLogger("pyvhost_user")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhost-user-net", description="virtio-net vhost-user back-end (pyvhost-user)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--fd", type=int, metavar="FDNUM", help="use this inherited socket fd")
    network = p.add_mutually_exclusive_group()
    network.add_argument("--switch", metavar="PATH",
                         help="attach to the switch listening on PATH (vhost-user-net-switch)")
    network.add_argument("--tap", metavar="NAME",
                         help="attach to tap NAME in this network namespace (created if absent)")
    p.add_argument("--mac", default=DEFAULT_MAC,
                   help=f"MAC address in the config space (default {DEFAULT_MAC})")
    p.add_argument("--mtu", type=int, default=1500, help="MTU in the config space (default 1500)")
    p.add_argument("--queue-pairs", type=int, default=1, metavar="N",
                   help="RX/TX queue pairs (a control queue comes after them)")
    p.add_argument("--no-guest-announce", action="store_true",
                   help="do not offer GUEST_ANNOUNCE: QEMU then asks us to send the RARP "
                   "after a migration (VHOST_USER_SEND_RARP)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (debug includes the protocol trace)")
    p.add_argument("--num-asids", type=int, default=2, metavar="N",
                   help="address spaces (ASIDs), each with its own IOTLB (default 2)")
    p.add_argument("--asid-default", choices=[d.value for d in DefaultMapping],
                   default="identity", help="see vhost-user-blk --help")
    p.add_argument("--iotlb-persist", choices=[i.value for i in IotlbPersist],
                   default="negotiated", help="see vhost-user-blk --help")
    p.add_argument("--memory-seal", choices=[s.value for s in SealPolicy], default="try",
                   help="see vhost-user-blk --help")
    p.add_argument("--flight-recorder", type=int, default=DEFAULT_CAPACITY, metavar="N",
                   help=f"events the flight recorder keeps (default {DEFAULT_CAPACITY})")
    p.add_argument("--trace-out", metavar="FILE", help="at exit, the flight recorder as a Chrome trace")
    p.add_argument("--sequence-out", metavar="FILE", help="at exit, a Mermaid sequence diagram")
    p.add_argument("--control-socket", metavar="PATH",
                   help="operator control socket (JSON, QMP-like; see vhost-user-ctl)")
    p.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600, metavar="OCTAL",
                   help="permissions of the socket file (default 600)")
    p.add_argument("--socket-group", metavar="GROUP", help="give the socket file to GROUP")
    return p


def _open_port(args: argparse.Namespace) -> PacketPort:
    if args.switch:
        return SwitchPort(args.switch)
    return TapPort(args.tap)


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
        print("vhost-user-net: one of --socket-path or --fd is required", file=sys.stderr)
        return 2
    if not (args.switch or args.tap):
        print("vhost-user-net: one of --switch or --tap is required", file=sys.stderr)
        return 2
    try:
        mac = parse_mac(args.mac)
    except ValueError as exc:
        print(f"vhost-user-net: --mac: {exc}", file=sys.stderr)
        return 2
    # The device's own limits before touching the network: a wrong number is
    # told as such, not as whatever attaching to a switch or a tap says.
    if not 1 <= args.queue_pairs <= MAX_QUEUE_PAIRS:
        print(f"vhost-user-net: --queue-pairs {args.queue_pairs} is not in 1..{MAX_QUEUE_PAIRS}",
              file=sys.stderr)
        return 2
    if not MIN_MTU <= args.mtu <= MAX_MTU:
        print(f"vhost-user-net: --mtu {args.mtu} is not in {MIN_MTU}..{MAX_MTU}", file=sys.stderr)
        return 2
    stop = StopOnSignal()
    try:
        port = _open_port(args)
    except (OSError, ValueError) as exc:
        print(f"vhost-user-net: cannot attach to the network: {exc}", file=sys.stderr)
        return 1
    try:
        device = NetDevice(port, mac=mac, mtu=args.mtu, queue_pairs=args.queue_pairs,
                           guest_announce=not args.no_guest_announce)
    except DeviceError as exc:
        port.close()
        print(f"vhost-user-net: {exc}", file=sys.stderr)
        return 1
    try:
        options = BackendOptions(
            num_asids=args.num_asids,
            asid_default=DefaultMapping(args.asid_default),
            iotlb_persist=IotlbPersist(args.iotlb_persist),
            memory_seal=SealPolicy(args.memory_seal),
        )
        recorder = FlightRecorder(args.flight_recorder)
    except ValueError as exc:
        print(f"vhost-user-net: {exc}", file=sys.stderr)
        device.close()
        return 1
    target = BackendControl(None)
    control = None
    if args.control_socket:
        try:
            control = ControlServer(args.control_socket, target)
            control.start()
        except (OSError, ValueError) as exc:
            print(f"vhost-user-net: cannot open the control socket: {exc}", file=sys.stderr)
            device.close()
            return 1
    try:
        server = BackendServer(
            device, socket_path=args.socket_path, fd=args.fd, socket_mode=args.socket_mode,
            socket_group=args.socket_group, options=options, recorder=recorder,
        )
    except (OSError, ValueError) as exc:
        print(f"vhost-user-net: cannot listen: {exc}", file=sys.stderr)
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
        log.info("net counters: %s", device.metrics.snapshot())
        device.close()
        write_traces(recorder, device.describe(), args.trace_out, args.sequence_out)
    log.info("stopped after %d front-end session(s)", server.sessions_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
