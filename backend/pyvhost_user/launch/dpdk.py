"""DPDK's testpmd as a vhost-user-net front-end (``net_virtio_user``), driven by commands.

    tp = start_testpmd(socket_path, mac="52:54:00:00:30:01", queue_pairs=2)
    tp.command("set fwd rxonly"); tp.start()
    tp.port_stats().rx_packets
    tp.quit()

testpmd connects to the back-end's socket as a client (``server=0``) when it
starts, so the back-end must be listening first. It runs interactive (``-i``)
with stdout unbuffered (``stdbuf -o0``: without it the output of a command
sits in stdio's buffer behind the next prompt); a command is written to its
stdin and its output read up to the next ``testpmd> `` prompt. That prompt is
the synchronisation: ``start tx_first N`` returns once the N bursts are on
the TX ring, ``stop`` once the forwarding core has stopped.

EAL options: ``--no-huge`` (EAL backs its memory with one memfd mapped
shared, which virtio_user sends in SET_MEM_TABLE: no hugepages on the host),
``--no-shconf`` and ``--no-telemetry`` (no shared config files, no
multi-process or telemetry sockets), a ``--file-prefix`` of its own, and
``--no-pci``. (``--in-memory`` cannot go with ``--no-huge`` in 22.11:
``--no-huge`` implies ``--legacy-mem``, which ``--in-memory`` refuses.)
Its EAL runtime directory is removed after it exits. Two lcores (the main
one, which reads commands, and one forwarding core) float over the CPUs
this process may use, so a busy-polling forwarding core is scheduled like
any thread instead of owning one CPU.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TESTPMD = "dpdk-testpmd"
PROMPT = b"testpmd> "
START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0
SETUP_HINT = "run scripts/setup.sh (it installs Debian's dpdk-dev, which has dpdk-testpmd)"


class TestpmdNotFound(RuntimeError):
    """dpdk-testpmd is not installed."""


class TestpmdError(RuntimeError):
    """testpmd exited, refused to start, or did not answer a command in time."""


def find_testpmd() -> str:
    """The path of dpdk-testpmd, or TestpmdNotFound saying how to get it."""
    path = shutil.which(TESTPMD)
    if path is None:
        raise TestpmdNotFound(f"{TESTPMD} is not on PATH: {SETUP_HINT}")
    if shutil.which("stdbuf") is None:
        raise TestpmdNotFound("stdbuf (coreutils) is not on PATH")
    return path


def runtime_dir(file_prefix: str) -> Path:
    """Where EAL puts its runtime files (eal_create_runtime_dir): /var/run/dpdk/PREFIX
    as root, else under $XDG_RUNTIME_DIR (or /tmp)."""
    base = "/var/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / file_prefix


def floating_lcores(lcores: int = 2) -> str:
    """``--lcores`` value: lcores 0..n-1 all allowed on every CPU we may run on."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return f"(0-{lcores - 1})@({cpus})"


def testpmd_argv(
    socket_path: str | os.PathLike[str],
    *,
    mac: str,
    queue_pairs: int = 1,
    queue_size: int = 256,
    peer_mac: str | None = None,
    memory_mb: int = 256,
    mbufs: int = 8192,
    packed_vq: bool = False,
    file_prefix: str = "pyvhost-user",
    extra_eal: Sequence[str] = (),
    extra_app: Sequence[str] = (),
    testpmd: str = TESTPMD,
) -> list[str]:
    """testpmd's argv (interactive, one virtio_user port on ``socket_path``)."""
    vdev = (f"net_virtio_user0,path={os.fspath(socket_path)},queues={queue_pairs},"
            f"queue_size={queue_size},mac={mac}")
    if packed_vq:
        vdev += ",packed_vq=1"
    eal = ["--lcores", floating_lcores(2), "--no-huge", "-m", str(memory_mb), "--no-shconf",
           "--file-prefix", file_prefix, "--no-telemetry", "--no-pci",
           "--vdev", vdev, *extra_eal]
    app = ["-i", f"--total-num-mbufs={mbufs}", f"--rxq={queue_pairs}", f"--txq={queue_pairs}",
           f"--rxd={queue_size}", f"--txd={queue_size}", "--nb-cores=1"]
    if peer_mac is not None:
        app.append(f"--eth-peer=0,{peer_mac}")
    return ["stdbuf", "-o0", testpmd, *eal, "--", *app, *extra_app]


@dataclass(frozen=True)
class PortStats:
    """``show port stats``: the port's counters since start (or ``clear port stats``)."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


@dataclass(frozen=True)
class ForwardStats:
    """The per-port block that ``stop`` prints: what the forwarding engine did."""

    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


_PORT_STATS = re.compile(
    r"RX-packets:\s+(\d+)\s+RX-missed:\s+(\d+)\s+RX-bytes:\s+(\d+)\s+"
    r"RX-errors:\s+(\d+)\s+RX-nombuf:\s+(\d+)\s+"
    r"TX-packets:\s+(\d+)\s+TX-errors:\s+(\d+)\s+TX-bytes:\s+(\d+)")
_FWD_STATS = re.compile(
    r"Forward statistics for port \d+\s+-+\s+"
    r"RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+)\s+RX-total:\s+\d+\s+"
    r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)")
_XSTAT = re.compile(r"^(\w+):\s+(\d+)\s*$", re.MULTILINE)


def parse_port_stats(text: str) -> PortStats:
    m = _PORT_STATS.search(text)
    if m is None:
        raise TestpmdError(f"no port statistics in:\n{text}")
    return PortStats(*(int(v) for v in m.groups()))


def parse_forward_stats(text: str) -> ForwardStats:
    m = _FWD_STATS.search(text)
    if m is None:
        raise TestpmdError(f"no forward statistics in:\n{text}")
    return ForwardStats(*(int(v) for v in m.groups()))


def parse_xstats(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in _XSTAT.findall(text)}


class Testpmd:
    """A running testpmd, by pid; everything it printed is also in ``log_path``."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path,
                 file_prefix: str) -> None:
        self.process = process
        self.log_path = log_path
        self.file_prefix = file_prefix
        self._log = open(log_path, "ab")
        self._pending = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _read_until_prompt(self, timeout: float, what: str) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while PROMPT not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestpmdError(f"testpmd (pid {self.pid}): no prompt after {what} "
                                   f"in {timeout} s; log {self.log_path}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                self.process.wait(10)
                raise TestpmdError(f"testpmd (pid {self.pid}) exited with "
                                   f"{self.process.returncode} during {what}:\n"
                                   f"{self.log()[-4000:]}")
            self._log.write(data)
            self._pending += data
        out, _, self._pending = self._pending.partition(PROMPT)
        return out.decode(errors="replace")

    def command(self, line: str, *, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run one command; its output (without the echoed command line)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise TestpmdError(f"testpmd (pid {self.pid}) is gone:\n{self.log()[-4000:]}") from exc
        out = self._read_until_prompt(timeout, repr(line))
        first, _, rest = out.partition("\n")
        return rest if first.strip() == line.strip() else out

    # -- the commands the tests and the benchmark use ---------------------------------
    def set_forward_mode(self, mode: str) -> None:
        out = self.command(f"set fwd {mode}")
        if f"Set {mode} packet forwarding mode" not in out:
            raise TestpmdError(f"set fwd {mode}: {out.strip()}")

    def start(self, tx_first: int | None = None) -> None:
        """``start``, or ``start tx_first N``: N bursts of txonly's packet first
        (on the ring when this returns), then the forwarding mode."""
        self.command("start" if tx_first is None else f"start tx_first {tx_first}")

    def stop(self) -> ForwardStats:
        return parse_forward_stats(self.command("stop"))

    def port_stats(self, port: int = 0) -> PortStats:
        return parse_port_stats(self.command(f"show port stats {port}"))

    def xstats(self, port: int = 0) -> dict[str, int]:
        return parse_xstats(self.command(f"show port xstats {port}"))

    def clear_stats(self) -> None:
        self.command("clear port stats all")

    def wait_rx_packets(self, count: int, *, timeout: float = COMMAND_TIMEOUT,
                        port: int = 0) -> PortStats:
        """Ask for the port's counters until RX-packets reaches ``count`` (each
        ask is a round trip to testpmd); TestpmdError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.port_stats(port)
            if stats.rx_packets >= count:
                return stats
            if time.monotonic() > deadline:
                raise TestpmdError(f"testpmd received {stats.rx_packets} of {count} frames "
                                   f"in {timeout} s")

    def quit(self, timeout: float = 20.0) -> int:
        """``quit`` (testpmd stops the port: the back-end sees GET_VRING_BASE), then
        SIGTERM and SIGKILL to its pid if it does not exit. Its exit status."""
        if self._log.closed:
            return self.process.returncode
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(b"quit\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        if self.process.stdout is not None:
            rest = self.process.stdout.read()
            self._log.write(rest)
            self.process.stdout.close()
        self._log.close()
        # EAL's runtime files (config, fbarrays) stay after exit even with --no-shconf.
        shutil.rmtree(runtime_dir(self.file_prefix), ignore_errors=True)
        return self.process.returncode


def start_testpmd(
    socket_path: str | os.PathLike[str],
    *,
    mac: str,
    log_path: str | os.PathLike[str],
    queue_pairs: int = 1,
    queue_size: int = 256,
    peer_mac: str | None = None,
    memory_mb: int = 256,
    mbufs: int = 8192,
    packed_vq: bool = False,
    extra_eal: Sequence[str] = (),
    extra_app: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> Testpmd:
    """Start testpmd on ``socket_path`` (the back-end must listen there) and
    return at its first prompt, when the port is configured and started.
    ``packed_vq``: virtio_user asks for packed rings (``packed_vq=1``)."""
    binary = find_testpmd()
    file_prefix = f"pyvhost-user-{uuid.uuid4().hex[:12]}"
    argv = testpmd_argv(socket_path, mac=mac, queue_pairs=queue_pairs, queue_size=queue_size,
                        peer_mac=peer_mac, memory_mb=memory_mb, mbufs=mbufs,
                        packed_vq=packed_vq, file_prefix=file_prefix, extra_eal=extra_eal, extra_app=extra_app,
                        testpmd=binary)
    log_path = Path(log_path)
    log_path.write_bytes((" ".join(argv) + "\n").encode())
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    testpmd = Testpmd(process, log_path, file_prefix)
    try:
        banner = testpmd._read_until_prompt(timeout, "start-up")
    except BaseException:
        testpmd.quit(5)
        raise
    if "Port 0 is closed" in banner or "Fail to start port" in banner:
        testpmd.quit(5)
        raise TestpmdError(f"testpmd could not start its port:\n{banner}")
    return testpmd
