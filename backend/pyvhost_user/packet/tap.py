"""A Linux tap device as the packet back-end (/dev/net/tun, IFF_TAP | IFF_NO_PI).

Attaches to the tap NAME in the caller's network namespace, creating it if
it does not exist (a created tap goes away with the process). No
IFF_VNET_HDR: the device offers no checksum or segmentation offload, so the
kernel has nothing to tell us in a header, and frames are plain Ethernet.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_FRAME = 65536 + 64


class TapPort:
    def __init__(self, name: str) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"tap name {name!r} is empty or longer than {IFNAMSIZ - 1} bytes")
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TAP | IFF_NO_PI)
            answer = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError:
            os.close(self.fd)
            raise
        self.interface = answer[:IFNAMSIZ].rstrip(b"\0").decode()
        self.name = f"tap {self.interface}"
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.send_errors = 0

    def start(self, deliver: Callable[[bytes], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(deliver,), name="tap", daemon=True)
        self._thread.start()

    def _run(self, deliver: Callable[[bytes], None]) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                frame = os.read(self.fd, MAX_FRAME)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.error("%s: read failed: %s", self.name, exc)
                return
            deliver(frame)

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as exc:
            # EIO while the interface is down: the kernel drops, so do we.
            self.send_errors += 1
            if self.send_errors == 1:
                log.warning("%s: write failed: %s", self.name, exc)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)
