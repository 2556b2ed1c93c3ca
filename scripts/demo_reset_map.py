#!/usr/bin/env python3
"""Demo: IOTLB mappings that survive device resets, and RESET_MAP that puts them back.

Plays a VMM that speaks the pyvhost-user address-space extension (with IOTLB
persistence) against a freshly started back-end, without a VM: the reference
front-end presents IOVAs (iova = gpa + a large offset), as a guest behind an
IOMMU does, and the back-end translates every ring and buffer address through
the IOTLB of ASID 0.

    .venv/bin/python scripts/demo_reset_map.py [--resets N] [--asid-default identity|empty] [--keep]

Steps: map all of guest RAM in ASID 0 (one batch), do I/O; reset the device N
times (mappings kept, no IOTLB message needed, I/O still correct); RESET_MAP(0)
(ASID 0 back to its default); summary. Exit 0 when every check holds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from pyvhost_user.frontend import BlkDriver, Iommu
from pyvhost_user.launch.backends import start_backend

SECTOR = 512


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


class Failed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)
    say(f"  ok: {what}")


def backend_iotlb_messages(backend) -> int:
    """IOTLB messages the back-end's protocol trace shows it received."""
    return len(re.findall(r"pyvhost_user\.trace: <- IOTLB_MSG(?:_ASID)?\b", backend.log()))


def io_round(driver: BlkDriver, image: Path, sector: int, label: str) -> None:
    data = (label.encode() + b"|") * (64 * 1024 // (len(label) + 1) + 1)
    data = data[: 64 * 1024]
    driver.write(sector, data)
    check(driver.read(sector, len(data)) == data, f"{label}: 64 KiB written and read back")
    on_disk = image.read_bytes()[sector * SECTOR : sector * SECTOR + len(data)]
    check(on_disk == data, f"{label}: the image file holds the same bytes")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    image = workdir / "disk.img"
    image.write_bytes(os.urandom(16 << 20))
    backend = start_backend(
        "pyvhost", image, workdir / "blk.sock", log_path=workdir / "backend.log",
        extra_args=("--asid-default", args.asid_default),
    )
    summary: dict[str, object] = {}
    try:
        say(f"back-end started (pid {backend.pid}), ASID default '{args.asid_default}'")
        say("step 1: connect as a VMM with the extension and IOTLB persistence; "
            "pre-map all guest RAM in ASID 0 (iova = gpa + offset)")
        with BlkDriver.connect(backend.socket_path, iommu="offset", premap=True,
                               extension=True, persist=True) as driver:
            fe = driver.frontend
            check(fe.extension and fe.persist, "the back-end accepted the extension and persistence")
            check(fe.access_platform, "ACCESS_PLATFORM negotiated: the device sees IOVAs only")
            say(f"  the back-end has {fe.get_num_asids()} address spaces; "
                f"ring 0 is in group {fe.get_vring_group(0)}")
            mapped = fe.iotlb_messages_sent
            say(f"  {mapped} IOTLB UPDATE(s) sent in one batch (one per RAM region)")
            io_round(driver, image, 0, "first I/O")
            check(fe.iotlb_counters["miss_received"] == 0, "no IOTLB miss: everything was pre-mapped")

            say(f"step 2: reset the device {args.resets} times (the guest reboots)")
            sent_before = fe.iotlb_messages_sent
            trace_before = backend_iotlb_messages(backend)
            for n in range(1, args.resets + 1):
                driver.reboot()
                io_round(driver, image, 256 * n, f"I/O after reset {n}")
            new_messages = fe.iotlb_messages_sent - sent_before
            check(new_messages == 0, "0 new IOTLB messages sent by the front-end across the resets")
            check(backend_iotlb_messages(backend) == trace_before,
                  "0 new IOTLB messages in the back-end's protocol trace")
            check(fe.iotlb_counters["miss_received"] == 0, "0 IOTLB misses: the mappings were kept")
            kept = backend.log().count("kept (persistence active)")
            check(kept >= args.resets, f"the back-end logged 'kept' at each reset ({kept} lines)")
            summary.update(resets=args.resets, messages_after_resets=new_messages)

            say("step 3: RESET_MAP(0): ASID 0 back to its default")
            fe.reset_map(0)
            check(f"default {args.asid_default} restored" in backend.log(),
                  f"the back-end restored the '{args.asid_default}' default of ASID 0")
            fe.premap = False  # the VMM does not map again: the default must carry I/O
            misses_before = fe.iotlb_counters["miss_received"]
            if args.asid_default == "identity":
                say("  identity default: the VMM now gives the device iova == gpa")
                fe.attach_iommu(0, Iommu.identity(driver.ram))
                driver.reboot()
                io_round(driver, image, 4096, "I/O at iova == gpa")
                check(fe.iotlb_counters["miss_received"] == misses_before,
                      "no miss: ASID 0 is passthrough again")
            else:
                say("  empty default: the old IOVAs are unknown again, the device must ask")
                driver.reboot()
                io_round(driver, image, 4096, "I/O after RESET_MAP")
                check(fe.iotlb_counters["miss_received"] > misses_before,
                      "the device missed and the VMM answered: ASID 0 is empty again")
            summary.update(
                misses_after_reset_map=fe.iotlb_counters["miss_received"] - misses_before,
                updates_sent=fe.iotlb_counters["update"],
            )
            if fe.responder is not None:
                fe.responder.check()
    finally:
        code = backend.stop()
        summary["backend_exit"] = code
    if code != 0:
        raise Failed(f"back-end exited with {code}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resets", type=int, default=3)
    parser.add_argument("--asid-default", default="identity", choices=["identity", "empty"])
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pvu-"))
    ok = False
    try:
        summary = run(args, workdir)
        ok = True
        say("summary:")
        say(f"  {summary['resets']} device resets, {summary['messages_after_resets']} IOTLB "
            "messages needed after them (a stock VMM re-maps or misses after every reset)")
        say(f"  RESET_MAP(0) restored the '{args.asid_default}' default; "
            f"{summary['misses_after_reset_map']} miss(es) after it")
        say(f"  {summary['updates_sent']} IOTLB UPDATE(s) in total; back-end exit "
            f"{summary['backend_exit']}")
        say("PASS")
    except Failed as exc:
        say(f"FAILED: {exc}")
    except Exception as exc:  # show why, with the log a person needs
        say(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        log = workdir / "backend.log"
        if not ok and log.exists():
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        if args.keep or not ok:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
