"""The reference front-end's device state transfer, against a scripted back-end.

What our back-end never does, and a front-end must still handle (vhost-user.rst,
SET_DEVICE_STATE_FD): a back-end that returns a channel of its own (bit 8 of
the reply clear, an fd with it), which the front-end must then use instead of
the pipe it sent; and a refusal in bits 0-7.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading

import pytest

from pyvhost_user.frontend import BackendRefused, Frontend
from pyvhost_user.wire import FrontendRequest as F

pytestmark = pytest.mark.timeout(20)
HEADER = struct.Struct("<III")


class ChannelBackend:
    """Answers SET_DEVICE_STATE_FD with ``reply`` (plus its own pipe end when bit 8 is
    clear and bits 0-7 are 0), then CHECK_DEVICE_STATE with ``check``."""

    def __init__(self, sock: socket.socket, reply: int, check: int, state: bytes) -> None:
        self.sock, self.reply, self.check, self.state = sock, reply, check, state
        self.loaded = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _receive(self) -> tuple[int, bytes, list[int]]:
        head, fds, _, _ = socket.recv_fds(self.sock, HEADER.size, 1)
        if not head:
            return -1, b"", []  # the front-end hung up
        code, _flags, size = HEADER.unpack(head)
        return code, self.sock.recv(size, socket.MSG_WAITALL) if size else b"", fds

    def _send(self, code: int, value: int, fds: list[int] = ()) -> None:
        data = HEADER.pack(code, 0x5, 8) + struct.pack("<Q", value)
        if fds:
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
            self.sock.sendmsg([data], [rights])
        else:
            self.sock.sendall(data)

    def _run(self) -> None:
        code, payload, fds = self._receive()
        assert code == F.SET_DEVICE_STATE_FD and len(fds) == 1
        direction, _phase = struct.unpack("<II", payload)
        os.close(fds[0])  # we use a channel of our own instead
        if self.reply & 0x1FF:
            self._send(code, self.reply)
        else:
            r, w = os.pipe()
            theirs, ours = (r, w) if direction == 0 else (w, r)
            self._send(code, self.reply, [theirs])
            os.close(theirs)
            if direction == 0:
                os.write(ours, self.state)
            else:
                while chunk := os.read(ours, 4096):
                    self.loaded += chunk
            os.close(ours)
        code, _payload, _fds = self._receive()
        if code == F.CHECK_DEVICE_STATE:  # not sent after a refused channel
            self._send(code, self.check)


@pytest.fixture
def frontend_with():
    made = []

    def make(reply: int, check: int = 0, state: bytes = b"") -> tuple[Frontend, ChannelBackend]:
        ours, theirs = socket.socketpair()
        frontend = Frontend(ours)
        backend = ChannelBackend(theirs, reply, check, state)
        made.append((frontend, backend))
        return frontend, backend

    yield make
    for frontend, backend in made:
        frontend.close()  # the scripted back-end sees the hang-up and returns
        backend.thread.join(5)
        assert not backend.thread.is_alive()
        backend.sock.close()


def test_save_reads_the_channel_the_backend_returned(frontend_with):
    frontend, backend = frontend_with(reply=0, state=b"the back-end's own state" * 1000)
    assert frontend.save_device_state() == b"the back-end's own state" * 1000


def test_load_writes_into_the_channel_the_backend_returned(frontend_with):
    frontend, backend = frontend_with(reply=0)
    frontend.load_device_state(b"for the destination" * 1000)
    backend.thread.join(5)
    assert backend.loaded == b"for the destination" * 1000


@pytest.mark.parametrize("reply", [0x101, 0x1FF])
def test_a_refused_channel_raises_with_the_reply(frontend_with, reply):
    frontend, _ = frontend_with(reply=reply)
    with pytest.raises(BackendRefused) as info:
        frontend.save_device_state()
    assert (info.value.request, info.value.code) == (F.SET_DEVICE_STATE_FD, reply)


def test_a_failed_check_raises(frontend_with):
    frontend, _ = frontend_with(reply=0x100, check=7)
    with pytest.raises(BackendRefused) as info:
        frontend.load_device_state(b"x")
    assert (info.value.request, info.value.code) == (F.CHECK_DEVICE_STATE, 7)
