"""``vhost-user-blk``: the virtio-blk back-end program.

Follows the back-end program conventions of QEMU's vhost-user.rst:
``--socket-path`` or ``--fd``, ``--print-capabilities``, ``--blk-file`` and
``--read-only``; exits non-zero early when it cannot start; ends cleanly on
SIGTERM (and SIGINT); never daemonizes.
"""

from __future__ import annotations

import argparse
import sys

from ..devices.base import DeviceError
from ..devices.blk import BlkDevice
from ..memory.map_cost import PUBLISHED_SECONDS_PER_GIB, MapCost
from ..server.options import QueueWorkers
from .backend_program import (
    StopOnSignal,
    add_common_arguments,
    new_parser,
    print_capabilities,
    serve,
    start_logging,
)

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("vhost-user-blk", "virtio-blk vhost-user back-end (pyvhost-user)")
    p.add_argument(
        "--image", "--blk-file", dest="image", metavar="FILE",
        help="raw image file or block device to serve",
    )
    p.add_argument("--read-only", action="store_true", help="refuse every write")
    p.add_argument("--num-queues", type=int, default=1, metavar="N", help="virtqueues (1..64)")
    p.add_argument("--serial", help="the id GET_ID returns (default: the image's file name)")
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
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        return print_capabilities(CAPABILITIES)
    start_logging(args)
    if args.socket_path is None and args.fd is None:
        print("vhost-user-blk: one of --socket-path or --fd is required", file=sys.stderr)
        return 2
    if not args.image:
        print("vhost-user-blk: --image (or --blk-file) is required", file=sys.stderr)
        return 2
    stop = StopOnSignal()
    try:
        device = BlkDevice(args.image, read_only=args.read_only, num_queues=args.num_queues,
                           serial=args.serial)
    except DeviceError as exc:
        print(f"vhost-user-blk: {exc}", file=sys.stderr)
        return 1
    try:
        cost = MapCost(args.map_cost)
        workers = QueueWorkers(args.queue_workers)
    except ValueError as exc:
        print(f"vhost-user-blk: {exc}", file=sys.stderr)
        device.close()
        return 1
    return serve("vhost-user-blk", device, args, stop, map_cost=cost,
                 map_cost_seconds_per_gib=args.map_cost_rate, io_threads=args.io_threads,
                 queue_workers=workers)


if __name__ == "__main__":
    sys.exit(main())
