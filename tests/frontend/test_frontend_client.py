"""Frontend's strictness, against a scripted fake backend on a socketpair."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from pyvhost_user.frontend import (
    BackendClosed,
    BackendRefused,
    Frontend,
    FrontendTimeout,
    GuestRam,
    ProtocolViolation,
)
from pyvhost_user.frontend.guest_ram import MiB
from pyvhost_user.wire import FrontendRequest as F
from pyvhost_user.wire import ProtocolFeature as PF

pytestmark = pytest.mark.timeout(20)
HEADER = struct.Struct("<III")
# A scripted answer: given (request code, flags, payload), the bytes to send back (None: none).
Script = Callable[[int, int, bytes], bytes | None]


def answer(code: int, payload: bytes, flags: int = 0x5) -> bytes:
    return HEADER.pack(code, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


class FakeBackend:
    """Reads whole messages on its end and answers as ``script`` says, in a thread."""

    def __init__(self, sock: socket.socket, script: Script) -> None:
        self.sock = sock
        self.script = script
        self.received: list[tuple[int, int, bytes]] = []
        self.answered = threading.Event()  # set after each answer is sent
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv_exact(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk, fds, _, _ = socket.recv_fds(self.sock, n - len(data), 8)
            for fd in fds:
                os.close(fd)
            if not chunk:
                return None
            data += chunk
        return data

    def _run(self) -> None:
        while (header := self._recv_exact(12)) is not None:
            code, flags, size = HEADER.unpack(header)
            payload = self._recv_exact(size) if size else b""
            self.received.append((code, flags, payload or b""))
            out = self.script(code, flags, payload or b"")
            if out is not None:
                self.sock.sendall(out)
                self.answered.set()


@pytest.fixture
def connect() -> Iterator[Callable[[Script], tuple[Frontend, FakeBackend]]]:
    made: list[tuple[Frontend, FakeBackend, GuestRam]] = []

    def make(script: Script) -> tuple[Frontend, FakeBackend]:
        ours, theirs = socket.socketpair()
        ram = GuestRam([(0, 1 * MiB)])
        frontend = Frontend(ours, ram, timeout=0.5)
        backend = FakeBackend(theirs, script)
        made.append((frontend, backend, ram))
        return frontend, backend

    yield make
    for frontend, backend, ram in made:
        frontend.close()  # the fake reads EOF and its thread ends
        backend.thread.join(5)
        backend.sock.close()
        ram.close()


def test_reply_is_read_and_checked(connect):
    frontend, _ = connect(lambda code, flags, p: answer(code, u64(0x1234)))
    assert frontend.get_features() == 0x1234


@pytest.mark.parametrize("bad_flags", [0x1, 0x4 | 0x2, 0xD])
def test_reply_flags_must_be_exactly_0x5(connect, bad_flags):
    frontend, _ = connect(lambda code, flags, p: answer(code, u64(1), flags=bad_flags))
    with pytest.raises(ProtocolViolation):
        frontend.get_features()


def test_reply_to_another_request_is_a_violation(connect):
    frontend, _ = connect(lambda code, flags, p: answer(F.GET_PROTOCOL_FEATURES, u64(1)))
    with pytest.raises(ProtocolViolation):
        frontend.get_features()


def test_silent_backend_times_out(connect):
    frontend, _ = connect(lambda code, flags, p: None)
    with pytest.raises(FrontendTimeout):
        frontend.get_queue_num()


def test_closed_backend(connect):
    frontend, backend = connect(lambda code, flags, p: None)
    backend.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(BackendClosed):
        frontend.get_features()


def test_need_reply_only_with_reply_ack_and_nonzero_ack_raises(connect):
    def script(code: int, flags: int, payload: bytes) -> bytes | None:
        if flags & 0x8:
            return answer(code, u64(7))
        return None

    frontend, backend = connect(script)
    frontend.set_mem_table()  # REPLY_ACK not negotiated: no NEED_REPLY, no wait
    frontend.protocol_features = int(PF.REPLY_ACK)
    with pytest.raises(BackendRefused) as refused:
        frontend.set_mem_table()
    assert refused.value.request == F.SET_MEM_TABLE and refused.value.code == 7
    sent = [(code, flags) for code, flags, _ in backend.received]
    assert sent == [(F.SET_MEM_TABLE, 0x1), (F.SET_MEM_TABLE, 0x9)]


def test_enforce_reply_without_reply_ack_uses_get_features(connect):
    """QEMU 10.0 must know SET_VRING_ENABLE was processed: without REPLY_ACK it syncs."""
    frontend, backend = connect(
        lambda code, flags, p: answer(code, u64(0)) if code == F.GET_FEATURES else None
    )
    frontend.set_vring_enable(0, True)
    assert [c for c, _, _ in backend.received] == [F.SET_VRING_ENABLE, F.GET_FEATURES]


def test_unsolicited_message_is_reported_at_the_next_send(connect):
    frontend, backend = connect(lambda code, flags, p: answer(code, u64(0)))  # acks everything
    frontend.set_owner()  # no reply due, yet one comes
    assert backend.answered.wait(5)
    with pytest.raises(ProtocolViolation, match="no reply was due"):
        frontend.get_features()


def test_never_negotiates_inband_notifications_or_xen_mmap(connect):
    offered = {F.GET_FEATURES: 1 << 30, F.GET_PROTOCOL_FEATURES: (1 << 20) - 1}

    def script(code: int, flags: int, payload: bytes) -> bytes | None:
        return answer(code, u64(offered[code])) if code in offered else None

    frontend, backend = connect(script)
    frontend.get_features()
    frontend.set_protocol_features(
        frontend.get_protocol_features() & frontend.supported_protocol_features()
    )
    assert not frontend.protocol_features & (PF.INBAND_NOTIFICATIONS | PF.XEN_MMAP)
    assert frontend.protocol_features & PF.DEVICE_STATE  # 10.0 knows bit 19
