"""Our back-end as a subprocess whose log is read line by line, for tests that wait on it.

``LiveBackend`` reads the back-end's log from a pipe in a thread and wakes
waiters on a condition: waiting for "front-end N disconnected" blocks until
that line exists (no polling, no sleeps). It also counts refusal lines by kind
and samples the process' fds, mappings and RSS from /proc. Shared by the fuzz
tests (tests/fuzz), the leak loop (tests/integration) and scripts/fuzz.py.
"""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

from pyvhost_user.launch.backends import backend_command


class Violation(AssertionError):
    """A property of the back-end does not hold."""


def normalise(text: str) -> str:
    """A log line with its numbers blanked: refusal kinds, not instances."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x#", text)
    text = re.sub(r"\b\d+\b", "#", text)
    return text.strip()


LINE_DISCONNECTED = re.compile(r"front-end (\d+) disconnected: (.*)$")
LINE_REFUSED = re.compile(r"refused ([A-Z][A-Z_0-9]*): (.*)$")
LINE_MALFORMED = re.compile(r"malformed message refused: (.*)$")
LINE_BROKEN = re.compile(r"marked broken \(device needs reset\): (.*)$")
LINE_BUG = re.compile(r"Traceback|internal error|worker failed|listener failed")
# Why a session may end without a bug of ours.
EXPECTED_DISCONNECTS = re.compile(
    r"closed by the front-end|connection lost|protocol framing broken|"
    r"was refused and the front-end waits|the front-end waits for a reply|"
    r"sent a reply \(.*\) nobody asked for"
)


class LiveBackend:
    """Our back-end as a subprocess, its log read line by line from a pipe.

    Waiting for a log line blocks on a condition the reader thread signals:
    no polling, no sleeps. Refusal lines are counted by kind.
    """

    def __init__(self, image: Path, socket_path: Path, log_path: Path,
                 extra_args: tuple[str, ...] = (), log_level: str = "info") -> None:
        command = backend_command("pyvhost", image, socket_path, extra_args=extra_args)
        command[command.index("--log-level") + 1] = log_level
        self.socket_path = socket_path
        self.log_path = log_path
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._cond = threading.Condition()
        self.tail: collections.deque[str] = collections.deque(maxlen=400)
        self.refusals: collections.Counter[str] = collections.Counter()
        self.disconnects: dict[int, str] = {}
        self.disconnect_kinds: collections.Counter[str] = collections.Counter()
        self.bug_lines: list[str] = []
        self.listening = False
        self.eof = False
        self._reader = threading.Thread(target=self._read, name="backend-log", daemon=True)
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.listening or self.eof, timeout=20):
                self.stop()
                raise RuntimeError("the back-end did not start listening in 20 s")
        if not self.listening:
            raise RuntimeError("the back-end exited at start:\n" + self.log_tail())
        self.sessions = 0  # front-ends connected so far

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in self.process.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                with self._cond:
                    self._parse(line)
                    self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def _parse(self, line: str) -> None:
        self.tail.append(line)
        if "listening on" in line:
            self.listening = True
        if m := LINE_DISCONNECTED.search(line):
            self.disconnects[int(m.group(1))] = m.group(2)
            self.disconnect_kinds[normalise(m.group(2))] += 1
        elif m := LINE_REFUSED.search(line):
            self.refusals[normalise(f"refused {m.group(1)}: {m.group(2)}")] += 1
        elif m := LINE_MALFORMED.search(line):
            self.refusals[normalise(f"malformed message refused: {m.group(1)}")] += 1
        elif m := LINE_BROKEN.search(line):
            self.refusals[normalise(f"marked broken: {m.group(1)}")] += 1
        if LINE_BUG.search(line):
            self.bug_lines.append(line)

    def log_tail(self, lines: int = 60) -> str:
        with self._cond:
            return "\n".join(list(self.tail)[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.fspath(self.socket_path))
        self.sessions += 1
        return sock

    def wait_disconnected(self, number: int | None = None, timeout: float = 10.0) -> str:
        """Block until session ``number`` (default: the last) has ended; its reason."""
        number = self.sessions if number is None else number
        with self._cond:
            done = self._cond.wait_for(lambda: number in self.disconnects or self.eof, timeout)
            if number in self.disconnects:
                return self.disconnects[number]
        if not done:
            raise Violation(f"session {number} did not end within {timeout} s (hang?)\n"
                            + self.log_tail())
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None  # its log closed but it still runs
        raise Violation(f"the back-end died (exit {code})\n" + self.log_tail())

    # -- resources ------------------------------------------------------------
    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds(self) -> dict[str, str]:
        out = {}
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out[name] = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                pass
        return out

    def map_count(self) -> int:
        with open(f"/proc/{self.pid}/maps") as maps:
            return sum(1 for _ in maps)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM to our own child, by pid
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode
