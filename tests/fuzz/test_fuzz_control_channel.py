"""Random and mutated vhost-user message sequences against a live back-end process.

One back-end per module, a fresh connection per example. Each example
(``fuzzlib.MessagePlanner``) is QEMU's bring-up with elements dropped, moved
or repeated, then valid messages of every request code (vendor extension
included) in any order with random payloads (ring indices, sizes, addresses
in and out of the memory sent, features, ASIDs, config ranges), random fds
(eventfds, pipes, memfds of every size, /dev/null, sockets), header mutations
(flags, sizes, payload bytes, fd counts, codes), and sometimes a truncated
message, garbage, an absurd size or an fd flood to end it.

Properties (``fuzzlib.run_message_case``):

* every request that asks for a reply (NEED_REPLY, a request whose answer is
  a value, or one whose reply a negotiated protocol feature makes due:
  SET_LOG_BASE with LOG_SHMFD, GET_INFLIGHT_FD with INFLIGHT_SHMFD,
  SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE with DEVICE_STATE) gets
  exactly one, with flags exactly VERSION|REPLY, its own request code, a
  payload of the right layout and the right number of fds (for
  SET_DEVICE_STATE_FD: as its no-fd bit says, none with an error), or the connection
  is closed, within ``REPLY_TIMEOUT``; nothing is sent unasked (a GET_FEATURES
  barrier ends each example); a framing error closes the connection;
* the session ends for an expected reason only (never "internal error" or a
  socket error), and the log shows no traceback;
* after each example the back-end is alive, holds exactly the fds it held
  before, and a fresh front-end (``BlkDriver.connect``) reads correct data;
* at the end SIGTERM stops it with status 0 and the image is unchanged.

The refusal kinds seen are printed in the terminal summary. The inputs of the
bugs reproduced below stay in the plans, so a regression is found twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzlib
from pyvhost_user.wire import FrontendRequest as F, ProtocolFeature as PF

pytestmark = pytest.mark.timeout(900)

READ_BYTES = 64 << 10


@dataclass(repr=False)  # hypothesis prints the arguments of a failing example
class Live:
    backend: fuzzlib.LiveBackend
    image: Path
    head: bytes
    offers: tuple[int, int]
    baseline_fds: dict[str, str]

    def __repr__(self) -> str:
        return f"Live(pid={self.backend.pid})"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    short = Path(tempfile.mkdtemp(prefix="pyvu-fz-"))  # socket paths are limited to 107 bytes
    image = tmp_path_factory.mktemp("fuzz-image") / "disk.img"
    image.write_bytes(os.urandom(4 << 20))
    digest = hashlib.md5(image.read_bytes()).hexdigest()
    log = tmp_path_factory.getbasetemp() / "fz.log"
    backend = fuzzlib.LiveBackend(image, short / "fz.sock", log)
    try:
        backend.sessions += 1
        offers = fuzzlib.learn_offers(backend.socket_path)
        backend.wait_disconnected()
        head = image.read_bytes()[:READ_BYTES]
        fuzzlib.read_check(backend, head)  # warm-up: what a first session creates for good
        yield Live(backend, image, head, offers, backend.fds())
        refusals = fuzzlib.summary(backend.refusals, "refusals")
        fuzzlib.REPORTS.append(("control channel: refusals", refusals))
        fuzzlib.REPORTS.append(
            ("control channel: session ends", fuzzlib.summary(backend.disconnect_kinds, "sessions"))
        )
    finally:
        code = backend.stop()
        shutil.rmtree(short, ignore_errors=True)
    assert code == 0, f"back-end exited with {code} on SIGTERM:\n{backend.log_tail()}"
    assert hashlib.md5(image.read_bytes()).hexdigest() == digest, "the image changed"


def check_after_example(live: Live) -> None:
    backend = live.backend
    fuzzlib.read_check(backend, live.head)
    fds = backend.fds()
    if fds != live.baseline_fds:
        extra = {k: v for k, v in fds.items() if live.baseline_fds.get(k) != v}
        raise fuzzlib.Violation(f"the back-end's fds changed after the session: {extra}")


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_message_sequences(live, data):
    pool = fuzzlib.FdPool()
    try:
        planner = fuzzlib.MessagePlanner(fuzzlib.HypothesisDraw(data), pool, *live.offers)
        steps = planner.plan()
        fuzzlib.run_message_case(live.backend, steps, *live.offers)
    finally:
        pool.close()
    check_after_example(live)


# -- reproducers of what the fuzzers found ------------------------------------------------


raw = fuzzlib.raw_header


@pytest.fixture
def lone(tmp_path, sock_dir, image):
    """A back-end of its own that may die: the test, not the teardown, judges its exit."""
    backend = fuzzlib.LiveBackend(image, sock_dir / "lone.sock", tmp_path / "lone.log",
                                  log_level="debug")
    yield backend
    backend.stop()


def exchange(sock: socket.socket, data: bytes, fds=()) -> tuple[int, int, bytes] | None:
    """Send one message that asks for a reply; its (code, flags, payload), None on close."""
    fuzzlib.send_step(sock, fuzzlib.Step(data, list(fds), 0, 0, "reproducer"))
    reader = fuzzlib.ReplyReader(sock)
    return reader.next(time.monotonic() + fuzzlib.REPLY_TIMEOUT)


def serves_next_and_stops_cleanly(backend: fuzzlib.LiveBackend, image: Path) -> None:
    backend.wait_disconnected()
    assert backend.alive(), backend.log_tail()
    fuzzlib.read_check(backend, image.read_bytes()[:READ_BYTES])
    assert not backend.bug_lines, backend.bug_lines
    assert backend.stop() == 0, backend.log_tail()


U64 = struct.Struct("<Q")


def test_refused_kick_fd_is_not_closed_twice(lone, image):
    sock = lone.connect()
    sock.sendall(raw(F.SET_OWNER))
    kick = os.eventfd(0)
    code, _flags, payload = exchange(sock, raw(F.SET_VRING_KICK, U64.pack(0), 0x9), [kick])
    assert code == F.SET_VRING_KICK and U64.unpack(payload)[0] != 0  # refused: ring not set up
    features = int(PF.BACKEND_REQ | PF.REPLY_ACK)
    assert exchange(sock, raw(F.SET_PROTOCOL_FEATURES, U64.pack(features), 0x9))[2] == bytes(8)
    ours, theirs = socket.socketpair()
    assert exchange(sock, raw(F.SET_BACKEND_REQ_FD, b"", 0x9), [theirs.fileno()])[2] == bytes(8)
    for fd in (kick, theirs.detach()):
        os.close(fd)
    sock.close()
    ours.close()
    serves_next_and_stops_cleanly(lone, image)


def test_backend_req_fd_that_is_not_a_socket_is_refused(lone, image):
    before = lone.fds()
    sock = lone.connect()
    features = int(PF.BACKEND_REQ | PF.REPLY_ACK)
    assert exchange(sock, raw(F.SET_PROTOCOL_FEATURES, U64.pack(features), 0x9))[2] == bytes(8)
    r, w = os.pipe()
    answer = exchange(sock, raw(F.SET_BACKEND_REQ_FD, b"", 0x9), [r])
    os.close(r)
    os.close(w)
    assert answer is not None, "the session was dropped instead of the request refused"
    assert U64.unpack(answer[2])[0] != 0
    sock.close()
    lone.wait_disconnected()
    assert lone.fds() == before, "the pipe's fd leaked"


MEMFD_SEALING = {
    "unsealable": os.MFD_CLOEXEC,  # like a tmpfs or hugetlbfs file: nobody can seal it
    "sealable": os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING,  # the back-end seals it
    "qemu": os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING,  # sealed already, as QEMU's memfd backend
}


def guest_memfd(kind: str, size: int = 1 << 20) -> int:
    fd = os.memfd_create("guest", MEMFD_SEALING[kind])
    os.ftruncate(fd, size)
    if kind == "qemu":
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def send_one_region_table(sock: socket.socket, memfd: int) -> int:
    """SET_MEM_TABLE with one 1 MiB region at gpa 0; the back-end's u64 answer."""
    table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, UVA, 0)
    return U64.unpack(exchange(sock, raw(F.SET_MEM_TABLE, table, 0x9), [memfd])[2])[0]


UVA = 0x7F00_0000_0000


@pytest.mark.parametrize("kind", ["sealable", "qemu"])
def test_memory_the_front_end_tries_to_shrink_stays_mapped(lone, image, kind):
    """Found by this fuzzer: a front-end that truncated its memfd after SET_MEM_TABLE
    made the back-end touch pages past the end of the file and die of SIGBUS. The
    back-end now seals what it maps against shrinking (memory/peer_fd.py)."""
    sock = lone.connect()
    sock.sendall(raw(F.SET_OWNER))
    memfd = guest_memfd(kind)
    assert send_one_region_table(sock, memfd) == 0
    assert fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 0)  # what the hostile front-end tries
    os.close(memfd)
    assert exchange(sock, raw(F.SET_VRING_NUM, struct.pack("<II", 0, 8), 0x9))[2] == bytes(8)
    addr = struct.pack("<IIQQQQ", 0, 0, UVA, UVA + 0x1000, UVA + 0x800, 0)
    assert exchange(sock, raw(F.SET_VRING_ADDR, addr, 0x9))[2] == bytes(8)
    kick = os.eventfd(0)
    assert exchange(sock, raw(F.SET_VRING_KICK, U64.pack(0), 0x9), [kick])[2] == bytes(8)
    os.close(kick)
    sock.close()
    serves_next_and_stops_cleanly(lone, image)


def test_an_unsealable_file_is_mapped_with_a_warning_by_default(lone, image):
    sock = lone.connect()
    sock.sendall(raw(F.SET_OWNER))
    memfd = guest_memfd("unsealable")
    assert send_one_region_table(sock, memfd) == 0
    os.close(memfd)
    sock.close()
    lone.wait_disconnected()
    assert "cannot be sealed against shrinking" in lone.log_tail()
    serves_next_and_stops_cleanly(lone, image)


@pytest.mark.parametrize("policy", ["try", "require"])
def test_a_file_shorter_than_its_region_is_refused(tmp_path, sock_dir, image, policy):
    backend = fuzzlib.LiveBackend(image, sock_dir / "short.sock", tmp_path / "short.log",
                                  extra_args=("--memory-seal", policy))
    try:
        sock = backend.connect()
        sock.sendall(raw(F.SET_OWNER))
        memfd = guest_memfd("sealable", size=1 << 16)  # the region says 1 MiB
        assert send_one_region_table(sock, memfd) != 0
        os.close(memfd)
        sock.close()
        serves_next_and_stops_cleanly(backend, image)
    finally:
        backend.stop()


def test_memory_seal_require_refuses_a_file_nobody_can_seal(tmp_path, sock_dir, image):
    backend = fuzzlib.LiveBackend(image, sock_dir / "req.sock", tmp_path / "req.log",
                                  extra_args=("--memory-seal", "require"))
    try:
        sock = backend.connect()
        sock.sendall(raw(F.SET_OWNER))
        for kind, answer in (("unsealable", "refused"), ("sealable", 0), ("qemu", 0)):
            memfd = guest_memfd(kind)
            got = send_one_region_table(sock, memfd)
            os.close(memfd)
            assert (got != 0) if answer == "refused" else got == 0, (kind, got)
        sock.close()
        backend.wait_disconnected()
        assert "--memory-seal require" in backend.log_tail()
        serves_next_and_stops_cleanly(backend, image)
    finally:
        backend.stop()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("kind", ["devnull", "pipe-w"])
def test_kick_fd_that_is_not_an_eventfd_does_not_spin(lone, image, kind):
    sock = lone.connect()
    sock.sendall(raw(F.SET_OWNER))
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 20)
    uva = 0x7F00_0000_0000
    table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, uva, 0)
    assert exchange(sock, raw(F.SET_MEM_TABLE, table, 0x9), [memfd])[2] == bytes(8)
    os.close(memfd)
    assert exchange(sock, raw(F.SET_VRING_NUM, struct.pack("<II", 0, 8), 0x9))[2] == bytes(8)
    addr = struct.pack("<IIQQQQ", 0, 0, uva, uva + 0x1000, uva + 0x800, 0)
    assert exchange(sock, raw(F.SET_VRING_ADDR, addr, 0x9))[2] == bytes(8)
    pool = fuzzlib.FdPool()
    try:
        answer = exchange(sock, raw(F.SET_VRING_KICK, U64.pack(0), 0x9), [pool.make(kind)])
    finally:
        pool.close()
    if answer is not None and U64.unpack(answer[2])[0] == 0:  # accepted: the ring runs
        before = cpu_seconds(lone.pid)
        # A measurement window, not a synchronisation: the back-end has nothing to do
        # in it, so it must not burn CPU (an idle worker blocks in poll()).
        select.select([sock], [], [], 1.0)
        used = cpu_seconds(lone.pid) - before
        assert used < 0.1, f"the idle back-end used {used:.2f} s of CPU in 1 s"
    sock.close()
    serves_next_and_stops_cleanly(lone, image)


def negotiate(sock: socket.socket, features: PF) -> None:
    value = int(features | PF.REPLY_ACK)
    assert exchange(sock, raw(F.SET_PROTOCOL_FEATURES, U64.pack(value), 0x9))[2] == bytes(8)


INFLIGHT = struct.Struct("<QQHH4x")


def test_set_inflight_fd_with_a_huge_size_is_refused(lone, image):
    sock = lone.connect()
    negotiate(sock, PF.INFLIGHT_SHMFD)
    memfd = os.memfd_create("inflight", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 16)
    answer = exchange(sock, raw(F.SET_INFLIGHT_FD, INFLIGHT.pack(1 << 63, 0, 1, 128), 0x9), [memfd])
    os.close(memfd)
    assert answer is not None, "the session was dropped instead of the request refused"
    assert U64.unpack(answer[2])[0] != 0
    sock.close()
    serves_next_and_stops_cleanly(lone, image)


@pytest.mark.parametrize("case", ["get-inflight-refused", "get-inflight-malformed",
                                  "set-log-base-malformed"])
def test_reply_due_without_need_reply_is_sent_or_the_connection_closed(lone, image, case):
    sock = lone.connect()
    if case.startswith("get-inflight"):
        negotiate(sock, PF.INFLIGHT_SHMFD)
        if case.endswith("refused"):  # 0 queues
            sock.sendall(raw(F.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 0, 128)))
        else:  # 8 bytes where 24 belong
            sock.sendall(raw(F.GET_INFLIGHT_FD, bytes(8)))
    else:
        negotiate(sock, PF.LOG_SHMFD)
        sock.sendall(raw(F.SET_LOG_BASE, struct.pack("<QQ", 4096, 0)))  # its fd missing
    reader = fuzzlib.ReplyReader(sock)
    try:
        reader.next(time.monotonic() + fuzzlib.REPLY_TIMEOUT)  # a reply, or None: closed
    finally:
        sock.close()
    serves_next_and_stops_cleanly(lone, image)


def test_no_reply_to_set_log_base_without_log_shmfd(lone, image):
    sock = lone.connect()
    memfd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 4096)
    fuzzlib.send_step(sock, fuzzlib.Step(raw(F.SET_LOG_BASE, struct.pack("<QQ", 4096, 0)),
                                         [memfd], F.SET_LOG_BASE, 0x1, "SET_LOG_BASE"))
    os.close(memfd)
    code, _flags, _payload = exchange(sock, raw(F.GET_FEATURES))
    assert code == F.GET_FEATURES, f"an unasked reply to request {code} came first"
    sock.close()
    serves_next_and_stops_cleanly(lone, image)
