"""Launch a QEMU test machine (TCG) with vhost-user-blk disks and the test guest.

    with Machine("10.0", workdir, disks=[VhostUserBlk(sock)], steps=["md5"]) as m:
        boot = m.wait_for_done(timeout=60)[0]
        assert boot["md5"] == ...

Every wait has a timeout: QEMU waits forever on a vhost-user backend that does
not answer. Errors (MachineError) carry the tails of the serial console and of
QEMU's own output (stdout + stderr, in ``qemu_log``).
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .guest import BootResults, count_done, guest_image, kernel_args, parse_results
from .qemu_binaries import QemuBinary, find_qemu

POLL_INTERVAL = 0.05
UNIX_PATH_MAX = 107

# A guest vIOMMU for vhost-user devices (Machine(viommu=True)): QEMU's emulated
# Intel IOMMU with interrupt remapping and a device IOTLB (ATS), the device
# options that put a virtio device behind it, and the guest kernel word that
# turns DMA remapping on. The device then negotiates VIRTIO_F_ACCESS_PLATFORM,
# its rings and buffers are IOVAs, and the back-end translates them through
# IOTLB_MSG updates (asking QEMU with IOTLB misses on the back-end channel).
VIOMMU_DEVICE = {"intremap": True, "device-iotlb": True}
VIOMMU_DISK_OPTIONS = {"iommu_platform": True, "ats": True, "disable-legacy": True}
# no_timer_check: with interrupt remapping, Linux panics ("timer doesn't work
# through Interrupt-remapped IO-APIC") when its boot-time timer check sees too
# few ticks in its window, which a TCG guest on a loaded host does (seen in CI).
VIOMMU_KERNEL_ARGS = ("intel_iommu=on", "no_timer_check")
# virtio-pci properties of type OnOffAuto (QMP wants "on"/"off" there).
_ON_OFF_AUTO = frozenset({"disable-legacy", "disable-modern"})


class MachineError(RuntimeError):
    """QEMU failed, exited early, or a wait failed; the message has the log tails."""


class MachineTimeout(MachineError, TimeoutError):
    """A wait on the machine timed out."""


def _opt(value: Any) -> str:
    """A QEMU option value: commas are doubled; bools are on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(none)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    out = text.splitlines()[-lines:]
    return "\n".join(out) if out else "(empty)"


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl   # loaded before any fork
except (OSError, AttributeError):  # pragma: no cover
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGTERM when the thread that started it dies
    (pytest's main thread, or this process killed by a timeout)."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG


@dataclass
class VhostUserBlk:
    """A vhost-user-blk-pci device whose backend listens on ``socket``."""

    socket: str | os.PathLike
    num_queues: int = 1
    reconnect: int | None = None        # chardev reconnect=N (seconds)
    id: str | None = None               # device id (default blk0, blk1, ...)
    options: dict[str, Any] = field(default_factory=dict)  # more -device options
    # Behind the machine's vIOMMU (iommu_platform, ats, disable-legacy): None
    # follows Machine(viommu=...); False keeps a device out of it on such a machine.
    iommu: bool | None = None
    # Behind a pcie-root-port of its own even without a vIOMMU: on q35 only a
    # device behind a port can be hot-unplugged (device_del) and plugged back.
    root_port: bool = False

    def device_id(self, index: int) -> str:
        return self.id or f"blk{index}"

    def chardev_id(self, index: int) -> str:
        return f"char-{self.device_id(index)}"

    def device_options(self, index: int, *, viommu: bool = False) -> dict[str, Any]:
        """The vhost-user-blk-pci properties (id, chardev, num-queues, the vIOMMU
        options and the root port's bus), as -device or QMP device_add takes them."""
        dev_id = self.device_id(index)
        options: dict[str, Any] = {"id": dev_id, "chardev": self.chardev_id(index),
                                   "num-queues": self.num_queues}
        options.update(self.options)
        if self._behind_iommu(viommu):
            for k, v in VIOMMU_DISK_OPTIONS.items():
                options.setdefault(k, v)
        if self._needs_root_port(viommu) and "bus" not in self.options:
            options["bus"] = f"rp-{dev_id}"
        return options

    def _behind_iommu(self, viommu: bool) -> bool:
        return bool(self.iommu or (self.iommu is None and viommu))

    def _needs_root_port(self, viommu: bool) -> bool:
        return "bus" not in self.options and (self.root_port or self._behind_iommu(viommu))

    def args(self, index: int, *, viommu: bool = False) -> list[str]:
        """-chardev and -device words; ``viommu``: the machine has a vIOMMU."""
        dev_id = self.device_id(index)
        chardev = self.chardev_id(index)
        sock = os.fspath(self.socket)
        if len(sock.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"socket path longer than {UNIX_PATH_MAX} bytes: {sock}")
        chr_opts = f"socket,id={chardev},path={_opt(sock)}"
        if self.reconnect is not None:
            chr_opts += f",reconnect={int(self.reconnect)}"
        root_port: list[str] = []
        if self._needs_root_port(viommu):
            # ATS needs a PCI Express device: QEMU makes a virtio device one only
            # behind a port, never on the root bus (there ats=on does nothing).
            # A port is also what makes the device hot-pluggable on q35.
            root_port = ["-device",
                         f"pcie-root-port,id=rp-{dev_id},bus=pcie.0,chassis={index + 1}"]
        dev = "vhost-user-blk-pci" + "".join(
            f",{k}={_opt(v)}" for k, v in self.device_options(index, viommu=viommu).items())
        return ["-chardev", chr_opts, *root_port, "-device", dev]


class _LoopThread:
    """An asyncio loop in a daemon thread, for the sync QMP wrapper."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever,
                                       name="qmp-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class Machine:
    """A QEMU process running the test guest (see guest-images/init.sh).

    qemu: "7.2", "10.0" or a QemuBinary.  workdir: where logs go (created).
    disks: VhostUserBlk devices (a plain path means one queue).
    steps, write_mib, guest_args: what the guest's /init does (kernel words;
    guest_args adds name=value words).  reboot: the guest reboots after its
    steps and QEMU runs without -no-reboot (each boot prints PVU-BOOT).
    memory: size of the shared memfd RAM.  extra_args: appended to QEMU's argv.
    viommu: a guest vIOMMU (intel-iommu, intremap=on, device-iotlb=on, plus
    ``iommu_options``), every disk behind it (iommu_platform=on, ats=on,
    disable-legacy=on; see VhostUserBlk.iommu) and ``intel_iommu=on`` on the
    guest kernel line.  q35 only.
    command_prefix: words before QEMU's command, e.g. netns.netns_exec(name)
    to run it in a network namespace; the prefix must exec QEMU (as ``ip
    netns exec`` does) so that ``pid``, signals and the exit code are QEMU's.
    """

    def __init__(
        self,
        qemu: str | QemuBinary = "10.0",
        workdir: str | os.PathLike | None = None,
        *,
        disks: Iterable[VhostUserBlk | str | os.PathLike] = (),
        steps: Sequence[str] | str = ("md5",),
        write_mib: int | None = None,
        disk: str | None = None,
        guest_args: dict[str, Any] | None = None,
        append: Sequence[str] = (),
        reboot: bool = False,
        memory: str = "256M",
        machine_type: str = "q35",
        smp: int = 1,
        accel: str = "tcg",
        kernel: str | os.PathLike | None = None,
        initrd: str | os.PathLike | None = None,
        extra_args: Sequence[str] = (),
        qmp: bool = True,
        viommu: bool = False,
        iommu_options: dict[str, Any] | None = None,
        name: str = "vm",
        die_with_parent: bool = True,
        command_prefix: Sequence[str] = (),
        serial_input: bool = False,
    ) -> None:
        self.qemu = qemu if isinstance(qemu, QemuBinary) else find_qemu(qemu)
        self.name = name
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"pvu-{name}-")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_input = serial_input
        # With serial_input, a "pipe" chardev: QEMU reads the console's input
        # from <base>.in (a FIFO, fed by send_serial) and writes its output to
        # <base>.out (a plain file here); 7.2's "file" chardev takes no input path.
        self._serial_base = self.workdir / f"{name}-serial"
        self.serial_log = (self._serial_base.with_name(f"{name}-serial.out") if serial_input
                           else self.workdir / f"{name}-serial.log")
        self._serial_in_fd: int | None = None
        self.qemu_log = self.workdir / f"{name}-qemu.log"   # QEMU's stdout + stderr
        self.qmp_socket: Path | None = None
        if qmp:
            self.qmp_socket = self.workdir / f"{name}-qmp.sock"
            if len(os.fsencode(self.qmp_socket)) > UNIX_PATH_MAX:
                self.qmp_socket = Path(tempfile.mkdtemp(prefix="pvu-qmp-")) / "qmp.sock"
        self.disks = [d if isinstance(d, VhostUserBlk) else VhostUserBlk(d) for d in disks]
        if viommu and machine_type.split(",")[0] != "q35":
            raise ValueError(f"viommu needs a q35 machine, not {machine_type!r}")
        self.viommu = viommu
        self.iommu_options = {**VIOMMU_DEVICE, **(iommu_options or {})}
        if kernel is None or initrd is None:
            k, i = guest_image()
            kernel = kernel or k
            initrd = initrd or i
        self.kernel, self.initrd = Path(kernel), Path(initrd)
        self.kernel_cmdline = " ".join(
            ["console=ttyS0", "panic=-1"]
            + kernel_args(steps, disk=disk, write_mib=write_mib, reboot=reboot,
                          **(guest_args or {}))
            + (list(VIOMMU_KERNEL_ARGS) if viommu else [])
            + list(append))
        self.reboot = reboot
        self.memory, self.machine_type, self.smp, self.accel = memory, machine_type, smp, accel
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.command_prefix = list(command_prefix)
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self._log_file = None
        self._serial_pos = 0
        self._serial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._loop: _LoopThread | None = None
        self._qmp = None
        self._events_task = None
        self.events: list[dict] = []        # QMP events received (dicts)
        self._events_cond = threading.Condition()

    # ---- command line -------------------------------------------------------

    def args(self) -> list[str]:
        """QEMU's argv (without the binary and its base args)."""
        a = [
            "-name", _opt(self.name),
            "-accel", self.accel,
            "-nodefaults", "-display", "none",
            "-object", f"memory-backend-memfd,id=mem,size={self.memory},share=on",
            "-machine", f"{self.machine_type},memory-backend=mem" + (
                # Interrupt remapping cannot use KVM's in-kernel irqchip; TCG
                # (7.2 and 10.0) needs nothing.
                ",kernel-irqchip=split" if self.viommu and self.accel == "kvm" else ""),
            "-smp", str(self.smp),
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", self.kernel_cmdline,
            "-chardev", (f"pipe,id=serial0,path={_opt(self._serial_base)}" if self.serial_input
                         else f"file,id=serial0,path={_opt(self.serial_log)}"),
            "-serial", "chardev:serial0",
        ]
        if not self.reboot:
            a.append("-no-reboot")
        if self.qmp_socket is not None:
            a += ["-qmp", f"unix:{_opt(self.qmp_socket)},server=on,wait=off"]
        if self.viommu:
            # Before every PCI device (QEMU 7.2 requires it of intel-iommu).
            a += ["-device", "intel-iommu" + "".join(
                f",{k}={_opt(v)}" for k, v in self.iommu_options.items())]
        for i, d in enumerate(self.disks):
            a += d.args(i, viommu=self.viommu)
        return a + self.extra_args

    def command(self) -> list[str]:
        """The whole argv: command prefix, QEMU binary, its base args, args()."""
        return [*self.command_prefix, *self.qemu.command(*self.args())]

    @property
    def ram_size(self) -> int:
        """Guest RAM in bytes (``memory``: a number with an optional K/M/G/T suffix)."""
        text = self.memory.strip().upper().removesuffix("B")
        shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(text[-1:], 0)
        return int(text[:-1] if shift else text) << shift

    # ---- life cycle ---------------------------------------------------------

    def start(self, *, wait_qmp: bool = True, timeout: float = 30.0) -> Machine:
        """Start QEMU; with QMP, wait (up to ``timeout``) until QMP answers.

        QEMU answers QMP only after it has set up its devices, i.e. after the
        vhost-user handshake with every backend: a timeout here usually means
        a backend that does not answer.
        """
        if self.proc is not None:
            raise MachineError("machine already started")
        for p in (self.serial_log, self.qemu_log):
            p.unlink(missing_ok=True)
        if self.qmp_socket is not None:
            self.qmp_socket.unlink(missing_ok=True)
        self.serial_log.touch()
        if self.serial_input:
            fifo = self._serial_base.with_name(f"{self.name}-serial.in")
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo, 0o600)
            # Held open read-write: QEMU's open of the FIFO then never blocks,
            # and the input stays queued until QEMU reads it.
            self._serial_in_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._log_file = open(self.qemu_log, "wb")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.qemu.env.items())
        self._log_file.write(
            f"$ {env + ' ' if env else ''}{shlex.join(self.command())}\n".encode())
        self._log_file.flush()
        self.started_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.command(), env=self.qemu.environ(), stdin=subprocess.DEVNULL,
                stdout=self._log_file, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if self.die_with_parent else None)
        except OSError as e:
            self._log_file.close()
            raise MachineError(f"cannot start {self.qemu.path}: {e}") from e
        if self.qmp_socket is not None and wait_qmp:
            try:
                self.connect_qmp(timeout)
            except BaseException:
                self.kill()
                raise
        return self

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def exit_code(self) -> int | None:
        """QEMU's exit status (None while it runs or before start)."""
        return self.proc.poll() if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def uptime(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait until QEMU exits (e.g. after the guest's poweroff); its exit code."""
        if self.proc is None:
            raise MachineError("machine not started")
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MachineTimeout(self.describe(
                f"QEMU still running after {timeout} s")) from None
        self._close()
        return code

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Stop QEMU: QMP quit, wait, then SIGTERM / SIGKILL by pid. Idempotent."""
        if self.proc is None:
            self._close()
            return None
        if self.proc.poll() is None and self._qmp is not None:
            try:
                self.qmp_command("quit", timeout=min(5.0, timeout))
            except Exception:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()
        return self.proc.returncode

    def kill(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s (by pid); waits for the exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._close()

    async def _disconnect(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            try:
                await self._events_task
            except BaseException:
                pass
            self._events_task = None
        await self._qmp.disconnect()

    def _close(self) -> None:
        if self._qmp is not None and self._loop is not None:
            try:
                self._loop.run(self._disconnect(), 5)
            except Exception:
                pass
            self._qmp = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._serial_in_fd is not None:
            os.close(self._serial_in_fd)
            self._serial_in_fd = None

    # ---- serial console -------------------------------------------------------

    def serial_text(self) -> str:
        """Everything the guest has printed on ttyS0 so far."""
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(self._serial_pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            self._serial_pos += len(data)
            self._serial += self._decoder.decode(data)
        return self._serial

    def send_serial(self, text: str) -> None:
        """Type ``text`` on the guest's console (Machine(serial_input=True)), e.g.
        the line that lets the guest's ``hold`` step go on."""
        if self._serial_in_fd is None:
            raise MachineError("machine not started with serial_input=True")
        os.write(self._serial_in_fd, text.encode())

    def results(self) -> list[BootResults]:
        """parse_results() of the serial console: one dict per boot."""
        return parse_results(self.serial_text())

    def qemu_output(self) -> str:
        """QEMU's stdout + stderr so far."""
        return self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""

    def describe(self, what: str) -> str:
        code = self.exit_code
        state = "running" if code is None else f"exit code {code}"
        return (f"{what} [QEMU {self.qemu.version}, pid {self.pid}, {state}, "
                f"up {self.uptime():.1f} s, workdir {self.workdir}]\n"
                f"--- serial console (tail) ---\n{_tail(self.serial_log)}\n"
                f"--- QEMU output (tail) ---\n{_tail(self.qemu_log, 30)}")

    def wait_for(self, what: str | Callable[[str], Any], timeout: float = 60.0,
                 *, count: int = 1, poll: float = POLL_INTERVAL) -> Any:
        """Poll the serial console until ``what`` holds; returns its value.

        ``what``: a marker string (wait until it appears ``count`` times; returns
        the text), or a predicate called with the whole console text (returns its
        first truthy value). Raises MachineTimeout after ``timeout`` s, and
        MachineError as soon as QEMU exits without it holding.
        """
        if self.proc is None:
            raise MachineError("machine not started")
        if isinstance(what, str):
            marker = what

            def check(text: str):
                return text if text.count(marker) >= count else None
            desc = f"{marker!r} x{count}"
        else:
            check = what
            desc = getattr(what, "__name__", repr(what))
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            value = check(self.serial_text())   # read after poll(): nothing is lost
            if value:
                return value
            if exited:
                raise MachineError(self.describe(f"QEMU exited before {desc}"))
            if time.monotonic() >= deadline:
                raise MachineTimeout(self.describe(f"timeout ({timeout} s) waiting for {desc}"))
            time.sleep(poll)

    def wait_for_done(self, timeout: float = 60.0, boots: int = 1) -> list[BootResults]:
        """Wait until ``boots`` boots have printed PVU-DONE; parse_results()."""
        def done(text: str):
            return count_done(text) >= boots
        done.__name__ = f"PVU-DONE x{boots}"
        self.wait_for(done, timeout)
        return self.results()

    # ---- QMP ------------------------------------------------------------------

    def connect_qmp(self, timeout: float = 30.0) -> None:
        """Connect to QEMU's QMP socket (retrying until ``timeout``)."""
        from qemu.qmp import QMPClient  # PyPI qemu.qmp

        if self.qmp_socket is None:
            raise MachineError("machine started without QMP")
        if self._qmp is not None:
            return
        if self._loop is None:
            self._loop = _LoopThread()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise MachineError(self.describe("QEMU exited before QMP answered"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineTimeout(self.describe(
                    f"QMP did not answer within {timeout} s (last error: {last!r}); "
                    "is a vhost-user backend not answering?"))
            if self.qmp_socket.exists():
                client = QMPClient(self.name)
                try:
                    self._loop.run(self._connect(client), remaining)
                    self._qmp = client
                    return
                except Exception as e:   # includes TimeoutError
                    last = e
                    try:
                        self._loop.run(client.disconnect(), 5)
                    except Exception:
                        pass
            time.sleep(POLL_INTERVAL)

    async def _connect(self, client) -> None:
        await client.connect(str(self.qmp_socket))
        self._events_task = asyncio.get_running_loop().create_task(
            self._collect_events(client))

    async def _collect_events(self, client) -> None:
        try:
            async for event in client.events:
                with self._events_cond:
                    self.events.append(dict(event))
                    self._events_cond.notify_all()
        except Exception:
            pass

    @property
    def qmp(self):
        """The connected ``qemu.qmp.QMPClient`` (async; run coroutines with
        ``run_async``) ."""
        if self._qmp is None:
            self.connect_qmp()
        return self._qmp

    def run_async(self, coro, timeout: float = 30.0):
        """Run a coroutine on the QMP event loop thread; its result."""
        if self._loop is None:
            raise MachineError("QMP not connected")
        return self._loop.run(coro, timeout)

    def qmp_command(self, name: str, timeout: float = 30.0, **args) -> Any:
        """Execute a QMP command; its return value. ``args`` use QMP's names
        (pass dashes with **{"a-b": 1})."""
        client = self.qmp
        try:
            return self._loop.run(client.execute(name, args or None), timeout)
        except TimeoutError:
            raise MachineTimeout(self.describe(
                f"QMP {name} got no answer within {timeout} s")) from None

    def read_phys_u16(self, gpa: int, count: int = 1, timeout: float = 10.0) -> list[int]:
        """``count`` u16 of guest physical memory at ``gpa`` (HMP ``xp``), e.g.
        a virtqueue's avail or used index."""
        out = self.qmp_command("human-monitor-command", timeout=timeout,
                               **{"command-line": f"xp /{int(count)}hx {int(gpa):#x}"})
        values: list[int] = []
        for line in str(out).splitlines():
            _, colon, rest = line.partition(":")
            if colon:
                values += [int(v, 16) for v in rest.split()]
        if len(values) != count:
            raise MachineError(f"xp at {gpa:#x}: {count} values expected, got {out!r}")
        return values

    def pmemsave(self, path: str | os.PathLike, start: int = 0, size: int | None = None,
                 timeout: float = 120.0) -> Path:
        """Write guest physical memory [start, start + size) to ``path`` (QMP
        ``pmemsave``; QEMU writes the file). ``size`` defaults to the RAM size,
        which is all of RAM when it lies below the PCI hole (q35: less than
        2.75 GiB of RAM).
        Works in every run state, e.g. on a migration source in "postmigrate"
        and on a destination kept paused with -S."""
        path = Path(path)
        self.qmp_command("pmemsave", timeout=timeout, val=int(start),
                         size=int(self.ram_size if size is None else size),
                         filename=os.fspath(path.absolute()))
        return path

    def wait_for_status(self, *statuses: str, timeout: float = 30.0) -> str:
        """Poll QMP ``query-status`` until the run state is one of ``statuses``
        (e.g. "postmigrate", "paused", "running"); that state."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp_command("query-status", timeout=timeout)["status"]
            if status in statuses:
                return status
            if time.monotonic() >= deadline:
                raise MachineTimeout(self.describe(
                    f"run state {status!r}, not {' or '.join(statuses)}, after {timeout} s"))
            time.sleep(POLL_INTERVAL)

    def wait_for_event(self, name: str, timeout: float = 30.0, *, count: int = 1) -> dict:
        """Wait until ``count`` QMP events called ``name`` arrived; the last one."""
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while True:
                seen = [e for e in self.events if e.get("event") == name]
                if len(seen) >= count:
                    return seen[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MachineTimeout(self.describe(
                        f"timeout ({timeout} s) waiting for QMP event {name} x{count}"))
                self._events_cond.wait(min(remaining, 0.5))

    # ---- hot-plug -----------------------------------------------------------------

    def device_del(self, device_id: str, timeout: float = 30.0) -> None:
        """Hot-unplug a device (QMP device_del) and wait for its DEVICE_DELETED
        event: the guest has released it and QEMU has removed it. Its chardev
        stays, ready for device_add."""
        before = sum(1 for e in self.events if e.get("event") == "DEVICE_DELETED"
                     and e.get("data", {}).get("device") == device_id)
        self.qmp_command("device_del", timeout=timeout, id=device_id)
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while sum(1 for e in self.events if e.get("event") == "DEVICE_DELETED"
                      and e.get("data", {}).get("device") == device_id) <= before:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MachineTimeout(self.describe(
                        f"no DEVICE_DELETED for {device_id} within {timeout} s"))
                self._events_cond.wait(min(remaining, 0.5))

    def device_add(self, disk: VhostUserBlk, index: int, timeout: float = 30.0) -> None:
        """Plug disk ``index`` (of ``disks``) back in with QMP device_add, on its
        chardev and root port as at start."""
        options = disk.device_options(index, viommu=self.viommu)
        for k in _ON_OFF_AUTO & options.keys():
            # OnOffAuto properties take "on"/"off" in QMP, not JSON booleans.
            if isinstance(options[k], bool):
                options[k] = _opt(options[k])
        self.qmp_command("device_add", timeout=timeout, driver="vhost-user-blk-pci", **options)
