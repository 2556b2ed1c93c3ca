"""``vhost-user-net``: the virtio-net back-end program.

Same conventions as vhost-user-blk (QEMU's vhost-user.rst): ``--socket-path``
or ``--fd``, ``--print-capabilities``; exits non-zero early when it cannot
start; ends cleanly on SIGTERM (and SIGINT); never daemonizes. Frames go to
the built-in switch (``--switch PATH``, see ``vhost-user-net-switch``) or a
tap device (``--tap NAME``).
"""

from __future__ import annotations

import argparse
import sys

from ..devices.base import DeviceError
from ..devices.net import NetDevice
from ..devices.net.config import parse_mac
from ..devices.net.constants import MAX_QUEUE_PAIRS
from ..devices.net.device import MAX_MTU, MIN_MTU
from ..devices.net.port import PacketPort
from ..packet import SwitchPort, TapPort
from .backend_program import (
    StopOnSignal,
    add_common_arguments,
    new_parser,
    print_capabilities,
    serve,
    start_logging,
)

CAPABILITIES = {"type": "net", "features": ["mac", "mtu", "queue-pairs", "switch", "tap"]}
DEFAULT_MAC = "52:54:00:12:34:56"


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("vhost-user-net", "virtio-net vhost-user back-end (pyvhost-user)")
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
    add_common_arguments(p)
    return p


def _open_port(args: argparse.Namespace) -> PacketPort:
    if args.switch:
        return SwitchPort(args.switch)
    return TapPort(args.tap)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        return print_capabilities(CAPABILITIES)
    start_logging(args)
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
    return serve("vhost-user-net", device, args, stop)


if __name__ == "__main__":
    sys.exit(main())
