"""Start and stop vhost-user-blk back-end processes: ours, or qemu-storage-daemon.

One launcher for tests, demos and benchmarks, so that every comparison runs
both back-ends the same way. A back-end is ready when its socket path exists:
ours creates it only once listening; qemu-storage-daemon creates it at bind,
just before listening, and QEMU and our front-end retry a refused connect.

``command_prefix`` puts words in front of the back-end's argv, e.g.
``netns.netns_exec(name)`` to run it in a network namespace; the prefix must
exec the program (as ``ip netns exec`` does), so that the pid, the signals
and the exit status are the back-end's own.
"""

from __future__ import annotations

import os
import platform
import signal
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .machine import VhostUserBlk
from .process import ListeningProcess, children, wait_listening
from .qemu_binaries import qemu_storage_daemon

BACKEND_KINDS = ("pyvhost", "qsd")
START_TIMEOUT = 20.0


class BackendError(RuntimeError):
    pass


@dataclass
class BackendProcess(ListeningProcess):
    kind: str
    socket_path: Path
    image: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    num_queues: int = 1
    read_only: bool = False
    extra_args: tuple[str, ...] = ()
    command_prefix: tuple[str, ...] = ()

    def device(self, **options: object) -> VhostUserBlk:
        """The matching vhost-user-blk-pci device for a ``Machine``."""
        options.setdefault("num_queues", self.num_queues)
        return VhostUserBlk(self.socket_path, **options)  # type: ignore[arg-type]


def backend_command(
    kind: str,
    image: Path,
    socket_path: Path,
    *,
    read_only: bool = False,
    num_queues: int = 1,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    if kind == "pyvhost":
        command = [
            sys.executable, "-m", "pyvhost_user.cli.blk",
            "--socket-path", str(socket_path), "--image", str(image),
            "--num-queues", str(num_queues), "--log-level", "debug",
        ]
        if read_only:
            command.append("--read-only")
        return command + list(extra_args)
    if kind == "qsd":
        binary = qemu_storage_daemon()
        return [
            str(binary),
            "--blockdev", f"driver=file,node-name=file0,filename={image}"
            + (",read-only=on" if read_only else ""),
            "--blockdev", "driver=raw,node-name=disk0,file=file0"
            + (",read-only=on" if read_only else ""),
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={socket_path},writable={'off' if read_only else 'on'},"
            f"num-queues={num_queues}",
            *extra_args,
        ]
    raise ValueError(f"unknown back-end kind {kind!r} (one of {', '.join(BACKEND_KINDS)})")


def start_backend(
    kind: str,
    image: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    num_queues: int = 1,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = START_TIMEOUT,
    command_prefix: Sequence[str] = (),
) -> BackendProcess:
    """Start a back-end and return once its socket exists (or raise ``BackendError``).

    ``command_prefix``: words before the command (see the module docstring)."""
    image, socket_path = Path(image), Path(socket_path)
    log_path = Path(log_path) if log_path else socket_path.with_suffix(".log")
    command = [*command_prefix, *backend_command(
        kind, image, socket_path, read_only=read_only, num_queues=num_queues, extra_args=extra_args
    )]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    backend = BackendProcess(kind, socket_path, image, process, log_path, num_queues, read_only,
                             tuple(extra_args), tuple(command_prefix))
    wait_listening(backend, socket_path, timeout, f"{kind} back-end", BackendError)
    return backend


def worker_pids(backend: BackendProcess) -> list[int]:
    """The back-end's children: its rings' worker processes (--queue-workers)."""
    return children(backend.pid)


def freeze_backend(backend: BackendProcess) -> None:
    """SIGSTOP a back-end and its worker processes (by pid): it holds whatever it
    was doing, its socket stays open, and the guest's requests pile up in the rings."""
    if backend.process.poll() is None:
        backend.process.send_signal(signal.SIGSTOP)
        for pid in worker_pids(backend):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass


def thaw_backend(backend: BackendProcess) -> None:
    """SIGCONT: a frozen back-end (and its worker processes) goes on."""
    if backend.process.poll() is None:
        for pid in worker_pids(backend):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        backend.process.send_signal(signal.SIGCONT)


# x86_64: what a thread of a back-end busy with a request is in: user mode (-1)
# or the image I/O system calls (pread64, pwrite64, readv, writev, fsync,
# fdatasync, preadv, pwritev, preadv2, pwritev2). Not a wait, and not write(2):
# that is the call eventfd (or a log line) once a request is completed.
_BUSY_SYSCALLS = frozenset({-1, 17, 18, 19, 20, 74, 75, 295, 296, 327, 328})


def frozen_threads(backend: BackendProcess) -> dict[int, int] | None:
    """For a frozen back-end: thread id -> the system call it stopped in (-1:
    user mode). None while some thread has not stopped yet, or when the
    process is gone."""
    threads: dict[int, int] = {}
    try:
        for tid in os.listdir(f"/proc/{backend.pid}/task"):
            base = f"/proc/{backend.pid}/task/{tid}"
            with open(f"{base}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"{base}/syscall") as f:
                words = f.read().split()
            if state not in ("T", "t") or not words or words[0] == "running":
                return None
            threads[int(tid)] = int(words[0])
    except (OSError, ValueError, IndexError):
        return None
    return threads


def frozen_busy(backend: BackendProcess) -> list[int] | None:
    """For a frozen back-end: the system calls of the threads caught at work
    on a request (-1: user mode; else preadv, pwritev, ...), empty when none
    was. None when that cannot be told (see frozen_threads; not x86_64)."""
    if platform.machine() != "x86_64":
        return None
    threads = frozen_threads(backend)
    if threads is None:
        return None
    return sorted(nr for nr in threads.values() if nr in _BUSY_SYSCALLS)


def kill_backend(backend: BackendProcess, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
    """Crash a back-end: ``sig`` (SIGKILL: no clean-up at all) to its pid, wait for
    it, then remove the socket file a dead listener leaves behind, so that the
    next back-end's socket is the one ``start_backend`` waits for. Its exit status."""
    if backend.process.poll() is None:
        backend.process.send_signal(sig)    # SIGKILL ends a stopped process too
    code = backend.process.wait(timeout)
    try:
        st = os.lstat(backend.socket_path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISSOCK(st.st_mode):
            backend.socket_path.unlink()
    return code


def restart_backend(
    backend: BackendProcess,
    *,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> BackendProcess:
    """A new back-end like ``backend`` (kind, image, socket, options, command
    prefix) once it has exited (see kill_backend); ``log_path``: its own log
    (default: the old one, overwritten)."""
    if backend.process.poll() is None:
        raise BackendError(f"{backend.kind} back-end (pid {backend.pid}) is still running")
    return start_backend(
        backend.kind, backend.image, backend.socket_path, read_only=backend.read_only,
        num_queues=backend.num_queues, log_path=log_path or backend.log_path,
        extra_args=backend.extra_args, timeout=timeout, command_prefix=backend.command_prefix)
