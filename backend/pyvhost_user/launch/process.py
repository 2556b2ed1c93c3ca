"""A program that we start and that is ready once it listens on a socket:
the blk back-ends, the net switch and net back-ends.

One handle (by pid, with its log; stopped with SIGTERM, then SIGKILL) and one
wait for readiness: none of these programs has a readiness signal other than
its socket file appearing, so that is polled, with a deadline. Also what
/proc tells about a process and its children (a back-end's worker processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

SOCKET_POLL_INTERVAL = 0.01


class ListeningProcess:
    """Methods for a dataclass with ``process`` (Popen) and ``log_path``."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (the back-end program convention), then SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_listening(handle: ListeningProcess, socket_path: Path, timeout: float, what: str,
                   error: Callable[[str], Exception]) -> None:
    """Return once ``socket_path`` exists; raise ``error(reason)`` if the program
    exits first, or stop it and raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    # Bounded poll for the socket: these programs have no other readiness signal.
    while not socket_path.exists():
        if handle.process.poll() is not None:
            raise error(f"{what} exited with {handle.process.returncode}:\n{handle.log()}")
        if time.monotonic() > deadline:
            handle.stop()
            raise error(f"{what} did not create {socket_path} in {timeout} s")
        time.sleep(SOCKET_POLL_INTERVAL)


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (a back-end's worker processes)."""
    pids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """User + system time so far of ``pid``, of its live children, and of the
    children it has reaped (every worker process a back-end has had)."""
    def ticks(of: int) -> int:
        with open(f"/proc/{of}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime

    total = ticks(pid)
    for child in children(pid):
        try:
            total += ticks(child)
        except FileNotFoundError:
            pass  # exited since: counted in cutime once reaped
    return total / os.sysconf("SC_CLK_TCK")
