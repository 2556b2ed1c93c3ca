"""``vhost-user-net-switch``: the learning switch vhost-user-net back-ends attach to.

    vhost-user-net-switch --socket-path /run/sw.sock &
    vhost-user-net --socket-path vm1.sock --switch /run/sw.sock &
    vhost-user-net --socket-path vm2.sock --switch /run/sw.sock &

Ready once the socket exists; ends cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ..packet import SwitchServer

log = logging.getLogger("pyvhost_user")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhost-user-net-switch",
                                description="L2 learning switch for vhost-user-net back-ends")
    p.add_argument("--socket-path", required=True, metavar="PATH",
                   help="the SOCK_SEQPACKET socket ports connect to")
    p.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600, metavar="OCTAL")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        switch = SwitchServer(args.socket_path, mode=args.socket_mode)
    except (OSError, ValueError) as exc:
        print(f"vhost-user-net-switch: cannot listen: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: switch.request_stop())
    log.info("switch on %s", args.socket_path)
    switch.serve_forever()
    log.info("switch stopped: %s", switch.counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
