"""Shared set-up of the avocado VM tests: one cell of the matrix, its back-end, its machine.

A cell is the avocado variant's parameters (see matrix.py):

    qemu     "7.2" | "10.0"
    viommu   "off" | "intel-iommu"       (Machine(viommu=True): device IOTLB, ATS)
    queues   1 | 4                        (4 queues: 4 vCPUs, so that Linux uses them all)
    mode     "rw" | "ro"                  (back-end --read-only)
    persist  "stock"                      (what QEMU negotiates: QEMU never acks the
                                           IOTLB persistence extension; frontend cells
                                           are in frontend_persist.py)

Everything a person needs after a failure lands in the test's output: the
back-end log (debug level: the protocol trace), every incarnation of it, the
flight recorder's trace (Chrome JSON and a summary, taken through the control
socket before the back-end stops), the guest's serial console and QEMU's output,
plus tails of them in the test's log (``self.log``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from avocado import Test
from pyvhost_user.control.client import ControlClient
from pyvhost_user.launch import Machine, VhostUserBlk, find_qemu, guest_image
from pyvhost_user.launch.backends import BackendProcess, kill_backend, restart_backend, start_backend

MiB = 1 << 20
DISK_MIB = 16
WRITE_MIB = 4
BOOT_TIMEOUT = 150.0          # TCG on 2 cores, 4 vCPUs, a vIOMMU, another test beside
FLIGHT_RECORDER_EVENTS = 20000
# query-address-spaces: the state of an ASID at its default (--asid-default).
DEFAULT_STATE = {"identity": "passthrough", "empty": "empty"}


def md5_file(path: Path, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        f.seek(offset)
        h.update(f.read() if length is None else f.read(length))
    return h.hexdigest()


def wait_until(condition, timeout: float, what: str, poll: float = 0.05):
    """Poll ``condition`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timeout ({timeout} s) waiting for {what}")
        time.sleep(poll)


class Cell:
    """The matrix parameters of one variant."""

    def __init__(self, params) -> None:
        self.qemu = str(params.get("qemu", default="10.0"))
        self.viommu = str(params.get("viommu", default="off"))
        self.queues = int(params.get("queues", default=1))
        self.mode = str(params.get("mode", default="rw"))
        self.persist = str(params.get("persist", default="stock"))
        if self.qemu not in ("7.2", "10.0") or self.viommu not in ("off", "intel-iommu") \
                or self.queues not in (1, 4) or self.mode not in ("rw", "ro"):
            raise ValueError(f"not a cell of the matrix: {self}")

    @property
    def read_only(self) -> bool:
        return self.mode == "ro"

    @property
    def has_viommu(self) -> bool:
        return self.viommu == "intel-iommu"

    def __str__(self) -> str:
        return (f"qemu={self.qemu} viommu={self.viommu} queues={self.queues} "
                f"mode={self.mode} persist={self.persist}")


class VMTestBase(Test):
    """:avocado: disable

    One cell: a random image, our back-end on it (debug log, control socket,
    flight recorder), and machines made with ``make_machine``.
    """

    timeout = 900     # per test: a 10-reboot loop on 4 vCPUs and a vIOMMU takes ~3 min

    def setUp(self) -> None:
        self.cell = Cell(self.params)
        self.log.info("cell: %s", self.cell)
        if self.cell.persist == "stock":
            self.qemu_binary = find_qemu(self.cell.qemu)  # a missing QEMU fails the test
            self.kernel, self.initrd = guest_image()
        self.out = Path(self.outputdir)
        # Unix socket paths are limited to 107 bytes: avocado's directories are long.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="pvu-av-"))
        # The image lives beside the sockets, removed at the end: the job results
        # keep logs and traces, not 16 MiB per test.
        self.image = self.sock_dir / "disk.img"
        with open(self.image, "wb") as f:
            f.writelines(os.urandom(MiB) for _ in range(DISK_MIB))
        self.host_md5 = md5_file(self.image)
        self.control_path = self.sock_dir / "ctl.sock"
        self.backends: list[BackendProcess] = []
        self.machines: list[Machine] = []
        self.backend = self.start_backend()

    # ---- back-end ----------------------------------------------------------------

    def backend_args(self) -> tuple[str, ...]:
        return ("--control-socket", str(self.control_path),
                "--flight-recorder", str(FLIGHT_RECORDER_EVENTS))

    def start_backend(self) -> BackendProcess:
        n = len(self.backends)
        backend = start_backend(
            "pyvhost", self.image, self.sock_dir / "blk.sock", read_only=self.cell.read_only,
            num_queues=self.cell.queues, log_path=self.out / f"backend-{n}.log",
            extra_args=self.backend_args())
        self.backends.append(backend)
        self.log.info("back-end %d started (pid %d), log %s", n, backend.pid, backend.log_path)
        return backend

    def crash_and_restart_backend(self) -> BackendProcess:
        """SIGKILL the back-end and start the same one again on the same sockets
        (the dead one leaves its control socket file behind: remove it)."""
        self.save_flight_recorder(self.backend, f"flight-recorder-{len(self.backends) - 1}")
        kill_backend(self.backend)
        self.control_path.unlink(missing_ok=True)
        n = len(self.backends)
        self.backend = restart_backend(self.backend, log_path=self.out / f"backend-{n}.log")
        self.backends.append(self.backend)
        self.log.info("back-end restarted (pid %d), log %s", self.backend.pid,
                      self.backend.log_path)
        return self.backend

    def control(self) -> ControlClient:
        return ControlClient(self.control_path)

    def address_spaces(self) -> list[dict]:
        with self.control() as c:
            spaces = c.execute("query-address-spaces")
        self.log.info("query-address-spaces: %s", json.dumps(spaces))
        return spaces

    def save_flight_recorder(self, backend: BackendProcess, name: str) -> None:
        """The flight recorder's trace (Chrome JSON, opens in Perfetto) and summary."""
        if not backend.alive() or not self.control_path.exists():
            return
        try:
            with self.control() as c:
                trace = c.execute("query-flight-recorder", {"format": "chrome"})
                summary = c.execute("query-flight-recorder", {"format": "summary"})
        except Exception as e:   # the trace is a diagnostic: never hide the real failure
            self.log.warning("flight recorder of back-end pid %d not saved: %s", backend.pid, e)
            return
        (self.out / f"{name}.json").write_text(
            trace if isinstance(trace, str) else json.dumps(trace))
        (self.out / f"{name}-summary.txt").write_text(
            summary if isinstance(summary, str) else json.dumps(summary, indent=1))

    # ---- machines ----------------------------------------------------------------

    def device(self, **options) -> VhostUserBlk:
        return VhostUserBlk(self.backend.socket_path, num_queues=self.cell.queues, **options)

    def make_machine(self, steps, *, disks=None, **kwargs) -> Machine:
        name = kwargs.pop("name", f"vm{len(self.machines)}")
        kwargs.setdefault("write_mib", WRITE_MIB)
        # Linux uses min(num-queues, vCPUs) queues.
        kwargs.setdefault("smp", self.cell.queues)
        m = Machine(self.qemu_binary, self.out / name, disks=disks or [self.device()],
                    steps=steps, viommu=self.cell.has_viommu, kernel=self.kernel,
                    initrd=self.initrd, name=name, **kwargs)
        self.machines.append(m)
        m.start()
        self.log.info("QEMU %s started: %s", self.cell.qemu, " ".join(m.command()))
        return m

    def write_steps(self) -> list[str]:
        return ["writefail"] if self.cell.read_only else ["write"]

    def check_boot(self, boot, m: Machine) -> None:
        self.assertTrue(boot.done, m.describe("guest did not finish its steps"))
        self.assertFalse(boot.errors, m.describe(f"guest errors: {boot.errors} {boot.dmesg}"))

    def check_write(self, boot) -> None:
        """The boot's write step, and the image on the host after it."""
        if self.cell.read_only:
            self.assertEqual(boot["write"], "refused")
            self.assertEqual(md5_file(self.image), self.host_md5, "read-only image changed")
        else:
            self.assertEqual(boot["write"], "ok")
            self.assertEqual(boot["readback_md5"], boot["write_md5"])
            self.assertEqual(md5_file(self.image, WRITE_MIB * MiB, 4 * MiB), boot["write_md5"],
                             "the guest's write is not on the host image")

    def expected_md5_after_write(self, boot) -> tuple[str, str, str]:
        """md5parts (head, range, tail) the next boot must read after ``boot``'s write."""
        return (md5_file(self.image, 0, WRITE_MIB * MiB),
                boot["write_md5"] if not self.cell.read_only
                else md5_file(self.image, WRITE_MIB * MiB, 4 * MiB),
                md5_file(self.image, (WRITE_MIB + 4) * MiB))

    def wait_backend_rings_started(self, backend: BackendProcess, count: int,
                                   timeout: float = 60.0) -> None:
        """Poll the back-end's trace until ``count`` rings got SET_VRING_KICK."""
        wait_until(lambda: backend.log().count("<- SET_VRING_KICK") >= count, timeout,
                   f"{count} SET_VRING_KICK in {backend.log_path}")

    def device_resets(self) -> tuple[int, int]:
        """Device resets every back-end incarnation logged: (IOTLBs reset to their
        default, IOTLBs kept)."""
        text = "".join(b.log() for b in self.backends)
        return (text.count("every ASID back to its default"),
                text.count("kept (persistence active)"))

    def check_stock_resets(self, at_least: int) -> None:
        """Stock QEMU: every device reset returned the IOTLBs to their default;
        none kept them (QEMU never negotiates persistence)."""
        reset, kept = self.device_resets()
        self.log.info("device resets: %d with the IOTLBs reset, %d kept", reset, kept)
        self.assertEqual(kept, 0, "a device reset kept the IOTLBs under stock QEMU")
        self.assertGreaterEqual(reset, at_least)

    def check_spaces_at_default(self) -> None:
        """Every ASID is at its default (nothing mapped): what a device reset leaves."""
        for space in self.address_spaces():
            self.assertEqual(space["entries"], 0, f"ASID {space['asid']} kept mappings")
            self.assertEqual(space["state"], DEFAULT_STATE[space["default"]])

    # ---- teardown: keep everything, show the tails on failure --------------------

    def tearDown(self) -> None:
        for m in self.machines:
            m.shutdown()
        for b in self.backends:
            if b is self.backend:
                self.save_flight_recorder(b, f"flight-recorder-{self.backends.index(b)}")
            code = b.stop()
            if b.alive() is False and code not in (0, -9, None):
                self.log.warning("back-end pid %d exited with %s", b.pid, code)
        # The test method has run: its status is "PASS" only when it passed.
        failed = self.status != "PASS"
        if failed or os.environ.get("PVU_AVOCADO_VERBOSE"):
            self.log_tails()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def log_tails(self) -> None:
        for m in self.machines:
            self.log.info("--- serial console of %s (tail) ---\n%s", m.name,
                          "\n".join(m.serial_text().splitlines()[-60:]))
            self.log.info("--- QEMU output of %s (tail) ---\n%s", m.name,
                          "\n".join(m.qemu_output().splitlines()[-30:]))
        for b in self.backends:
            self.log.info("--- back-end log %s (tail) ---\n%s", b.log_path.name,
                          "\n".join(b.log().splitlines()[-80:]))
