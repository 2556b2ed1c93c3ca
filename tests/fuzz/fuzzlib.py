"""Generators and oracles shared by the fuzz tests and ``scripts/fuzz.py``.

Every generator draws through a ``Draw`` (``RandomDraw``: a seeded
``random.Random``, for long runs; ``HypothesisDraw``: hypothesis' ``data``
object, so examples shrink), so the tests and the script run exactly the same
cases. Two targets:

* the vhost-user channel of a live back-end process (``LiveBackend`` from
  tests/live_backend.py, ``MessagePlanner``, ``run_message_case``): message
  sequences in and out of protocol order, mutated headers, wrong fds,
  truncated messages, garbage;
* the descriptor walker and the blk device in-process (``RingRig``,
  ``run_chain_case``): random rings in memfd guest memory.

A property violation raises ``Violation``; the callers count or fail. The
inputs of every bug the fuzzers found stay in the plans (each also has a
reproducer in test_fuzz_control_channel.py), so a regression is found again.
"""

from __future__ import annotations

import array
import collections
import ctypes
import fcntl
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from live_backend import EXPECTED_DISCONNECTS, LiveBackend, Violation, normalise  # noqa: F401
from pyvhost_user import wire
from pyvhost_user.devices.blk.device import BlkDevice
from pyvhost_user.frontend.guest_ram import GuestRam, GuestRamError
from pyvhost_user.memory import DirectSpace, GuestMemory, map_region
from pyvhost_user.virtqueue import (
    BadChain,
    InvalidQueueConfig,
    QueueConfig,
    QueueCorrupted,
    SplitQueue,
)
from pyvhost_user.wire import FRONTEND_LAYOUTS, FrontendRequest as F, VendorRequest as VR
from pyvhost_user.wire.messages import (
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    MemRegion,
    MemTable,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
REPLY_TIMEOUT = 2.0  # a reply, or the connection closed, within this
PAGE = 4096




# -- draws ------------------------------------------------------------------------


class RandomDraw:
    """Plain seeded random: fast, no shrinking (scripts/fuzz.py)."""

    def __init__(self, rng) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def bool(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class HypothesisDraw:
    """Draws through hypothesis (``st.data()``), so failures shrink."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self._st = st
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self._st.integers(lo, hi))

    def bool(self, p: float = 0.5) -> bool:
        # 0 (where hypothesis starts and shrinks to) is False
        return self.data.draw(self._st.integers(0, 999)) >= (1 - p) * 1000

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.data.draw(self._st.integers(0, len(seq) - 1))]

    def bytes(self, n: int) -> bytes:
        return self.data.draw(self._st.binary(min_size=n, max_size=n))


def interesting_u64(d, near: Sequence[int] = ()) -> int:
    kind = d.int(0, 9)
    if kind == 0:
        return d.choice([0, 1, 2, 0xFFFF, 0x10000, U32_MAX, 1 << 32, 1 << 63, U64_MAX, U64_MAX - 7])
    if kind <= 4 and near:
        return max(0, min(U64_MAX, d.choice(near) + d.choice([0, 0, 16, 4096, -16, 0x1000000])))
    if kind <= 6:
        return d.int(0, 1 << 24)
    return d.int(0, U64_MAX)


# -- fds the fuzzer attaches ---------------------------------------------------------------

FD_KINDS = ("eventfd", "memfd", "memfd-sealable", "memfd-qemu", "memfd-empty", "pipe-r",
            "pipe-w", "devnull", "socket")
# memfd: no seals possible (like a tmpfs or hugetlbfs file); memfd-sealable: made with
# MFD_ALLOW_SEALING, which the back-end seals against shrinking when it maps it;
# memfd-qemu: sealed GROW|SHRINK|SEAL, as QEMU's memory-backend-memfd sends them.
SEALABLE_MEMFD_KINDS = ("memfd-sealable", "memfd-qemu")


class FdPool:
    """Fds made for one case; all closed at its end (the back-end holds its own copies)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.sealable: list[int] = []  # memfds whose shrinking a seal must stop

    def make(self, kind: str, size: int = 1 << 20) -> int:
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind.startswith("memfd"):
            sealing = os.MFD_ALLOW_SEALING if kind in SEALABLE_MEMFD_KINDS else 0
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | sealing)
            size = 0 if kind == "memfd-empty" else size
            os.ftruncate(fd, size)
            if kind == "memfd-qemu":
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            if sealing:
                self.sealable.append(fd)
        elif kind in ("pipe-r", "pipe-w"):
            r, w = os.pipe2(os.O_CLOEXEC)
            keep, other = (r, w) if kind == "pipe-r" else (w, r)
            self.fds.append(other)
            fd = keep
        elif kind == "devnull":
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        elif kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.fds.append(b.detach())
            fd = a.detach()
        else:
            raise ValueError(kind)
        self.fds.append(fd)
        return fd

    def shrink_sealable(self) -> None:
        """What a hostile front-end does after sending guest memory: truncate it. The
        back-end must have sealed every sealable memfd it mapped (EPERM here); one it
        did not map may shrink, and must then be refused if it comes later."""
        for fd in self.sealable:
            try:
                os.ftruncate(fd, 0)
            except PermissionError:
                pass

    def close(self) -> None:
        wire.close_all(self.fds)
        self.fds.clear()


# -- message plans ---------------------------------------------------------------------------

# Requests that are answered with a value of their own whatever the flags
# (vhost-user.rst "always require a reply"; the ones that need a protocol
# feature this back-end never offers are left out: without it no reply is due).
REPLY_CODES = frozenset({
    F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM, F.GET_MAX_MEM_SLOTS,
    F.GET_VRING_BASE, F.GET_CONFIG, F.GET_STATUS, VR.GET_NUM_ASIDS, VR.GET_VRING_GROUP,
})
# Requests whose reply is due, NEED_REPLY or not, once a protocol feature is negotiated.
CONDITIONAL_REPLY = {
    F.SET_LOG_BASE: wire.ProtocolFeature.LOG_SHMFD,
    F.GET_INFLIGHT_FD: wire.ProtocolFeature.INFLIGHT_SHMFD,
    F.SET_DEVICE_STATE_FD: wire.ProtocolFeature.DEVICE_STATE,
    F.CHECK_DEVICE_STATE: wire.ProtocolFeature.DEVICE_STATE,
}
REPLY_FDS = {F.GET_INFLIGHT_FD: 1}  # a value reply carrying an fd
# The u64 answering SET_DEVICE_STATE_FD (vhost-user.rst): bits 0-7 an error code (0:
# success), bit 8 "no fd": the back-end's own channel comes with the reply exactly
# when it is clear, and never with an error. No other bit is defined.
DEVICE_STATE_ERROR, DEVICE_STATE_NO_FD = 0xFF, 0x100
UNKNOWN_CODES = (0, 26, 33, 41, 44, 45, 999, 0x4000, 0x4008, U32_MAX)
SESSION_CODES = sorted(FRONTEND_LAYOUTS)
RING_SIZE, RING_AVAIL, RING_USED = 8, 0x80, 0x100  # the ring write_ring leaves in a memfd


@dataclass
class Step:
    """One write on the socket and what the back-end must do about it."""

    data: bytes
    fds: list[int]
    code: int
    flags: int
    label: str
    framing_bad: bool = False  # the back-end must drop the connection
    final: bool = False  # nothing can follow (truncated, garbage)
    action: Callable[[], None] | None = None  # done instead of a write (data is empty)

    def value_reply(self, negotiated: int) -> bool:
        """Whether the answer due is a value of the request's own (not a u64 ack)."""
        if self.flags & 0x4:
            return False  # a "reply" from the front-end is refused; only NEED_REPLY asks
        needed = CONDITIONAL_REPLY.get(self.code)
        return self.code in REPLY_CODES or (needed is not None and bool(negotiated & needed))

    def expects_answer(self, negotiated: int) -> bool:
        return not self.framing_bad and not self.final and (
            bool(self.flags & 0x8) or self.value_reply(negotiated)
        )


@dataclass
class PlanState:
    offered: int
    offered_protocol: int
    regions: list[MemRegion] = field(default_factory=list)
    rings: list[int] = field(default_factory=list)  # uvas of regions with a ring at their start


class MessagePlanner:
    """Builds the steps of one case from a ``Draw``."""

    def __init__(self, d, pool: FdPool, offered: int, offered_protocol: int) -> None:
        self.d = d
        self.pool = pool
        self.state = PlanState(offered, offered_protocol)

    # -- values -----------------------------------------------------------
    def ring_index(self) -> int:
        return self.d.choice([0, 0, 0, 0, 1, 2, 255, 256, U32_MAX])

    def uva_near(self) -> list[int]:
        regions = self.state.regions
        return [r.user_addr for r in regions] + [r.guest_phys_addr for r in regions]

    def region(self) -> tuple[MemRegion, int]:
        d = self.d
        kind = d.choice(["memfd"] * 3 + ["memfd-sealable"] * 2 + ["memfd-qemu", "memfd-empty",
                                                                 "eventfd", "pipe-r", "devnull"])
        size = d.choice([PAGE, 16 * PAGE, 1 << 20])
        fd = self.pool.make(kind, size)
        gpa = d.choice([0, 1 << 20, 1 << 32, d.int(0, 1 << 40) & ~(PAGE - 1)])
        uva = d.choice([0x7F00_0000_0000 + gpa, gpa, d.int(0, 1 << 47) & ~(PAGE - 1)])
        offset = d.choice([0, 0, PAGE, 1, size])
        rsize = d.choice([size, size, PAGE, size * 2, 1])
        region = MemRegion(gpa, rsize, uva, offset)
        if kind.startswith("memfd") and not self.d.bool(0.1):
            self.state.regions.append(region)
            # A file sealed against growing takes no write past its end.
            grows = kind != "memfd-qemu" or offset + 16 * PAGE <= size
            if kind != "memfd-empty" and grows and size >= 16 * PAGE and rsize >= 16 * PAGE and offset % PAGE == 0:
                self.write_ring(fd, region)
        return region, fd

    def write_ring(self, fd: int, region: MemRegion) -> None:
        """A ring of 8 at the region's start with requests that do not change the image
        (IN, GET_ID, FLUSH, unknown types), so a ring started there makes the worker and
        the device run; SET_VRING_NUM/ADDR pick it up through ``self.state.rings``."""
        d = self.d
        gpa, base = region.guest_phys_addr, region.mmap_offset
        table, avail = bytearray(16 * RING_SIZE), [0, 0]
        for k in range(d.int(0, RING_SIZE)):
            kind = d.choice([0, 0, 8, 4, 10, 99])
            header, data, status = 0x1000 + 0x100 * k, 0x2000 + 0x1000 * k, 0x9000 + k
            os.pwrite(fd, struct.pack("<IIQ", kind, 0, d.choice([0, 1, 8, 1 << 40])), base + header)
            length = d.choice([512, 4096, 0, 100])
            ids = [3 * k % RING_SIZE, (3 * k + 1) % RING_SIZE, (3 * k + 2) % RING_SIZE]
            DESC.pack_into(table, 16 * ids[0], gpa + header, 16, F_NEXT, ids[1])
            DESC.pack_into(table, 16 * ids[1], gpa + data, length, F_NEXT | F_WRITE, ids[2])
            DESC.pack_into(table, 16 * ids[2], gpa + status, 1, F_WRITE, 0)
            avail.append(ids[0])
        count = len(avail) - 2
        avail[1] = count if not d.bool(0.1) else d.int(0, 0xFFFF)
        os.pwrite(fd, bytes(table), base)
        os.pwrite(fd, struct.pack(f"<{len(avail)}H", *avail), base + RING_AVAIL)
        self.state.rings.append(region.user_addr)

    def features(self) -> int:
        d = self.d
        value = self.state.offered & d.int(0, U64_MAX)
        if d.bool(0.7):
            value |= 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES, as QEMU always acks
        if d.bool(0.1):
            value |= 1 << d.int(0, 63)
        return value

    def protocol_features(self) -> int:
        d = self.d
        value = self.state.offered_protocol & d.int(0, U64_MAX)
        if d.bool(0.1):
            value |= 1 << d.int(0, 63)
        return value

    def fd(self, code: int) -> int:
        kind = self.d.choice(FD_KINDS)
        if code == F.SET_BACKEND_REQ_FD and self.d.bool(0.7):
            kind = "socket"
        return self.pool.make(kind)

    def payload(self, code: int) -> tuple[object, list[int]]:
        d = self.d
        layout = FRONTEND_LAYOUTS[code]
        near = self.uva_near()
        if code == F.SET_FEATURES:
            return U64(self.features()), []
        if code == F.SET_PROTOCOL_FEATURES:
            return U64(self.protocol_features()), []
        if code == F.SET_STATUS:
            status = d.choice([0, 1, 3, 0xB, 0xF, 0x40, 0x4F, 0xFF, 0x100, d.int(0, U64_MAX)])
            return U64(status), []
        if code == VR.RESET_MAP:
            return U64(d.choice([0, 0, 1, 2, 3, 255, 1 << 32, d.int(0, U64_MAX)])), []
        if code == F.SET_VRING_NUM:
            return VringState(self.ring_index(), d.choice(
                [1, 2, 4, 8, 16, 128, 256, 1024, 0, 3, 2048, 32768, 65535, d.int(0, U32_MAX)])), []
        if code == F.SET_VRING_BASE:
            base = d.choice([0, 1, 65535, 65536, d.int(0, U32_MAX)])
            return VringState(self.ring_index(), base), []
        if code == VR.SET_GROUP_ASID:
            group = d.choice([0, 0, 1, U32_MAX])
            return VringState(group, d.choice([0, 1, 2, 3, 4, 255, U32_MAX])), []
        if layout.request is VringState:
            return VringState(self.ring_index(), d.choice([0, 1, 2, d.int(0, U32_MAX)])), []
        if code == F.SET_VRING_ADDR and self.state.rings and d.bool(0.6):
            uva = d.choice(self.state.rings)
            return VringAddr(self.ring_index(), 0, uva, uva + RING_USED, uva + RING_AVAIL, 0), []
        if code == F.SET_VRING_NUM and self.state.rings and d.bool(0.6):
            return VringState(self.ring_index(), RING_SIZE), []
        if code == F.SET_VRING_ADDR:
            def addr(align: int) -> int:
                if d.bool(0.9):
                    return interesting_u64(d, near) & ~(align - 1)
                return interesting_u64(d)

            return VringAddr(self.ring_index(), d.choice([0, 0, 1]), addr(16), addr(4), addr(2),
                             interesting_u64(d)), []
        if layout.request is VringFile:
            no_fd = d.bool(0.15)
            fds = [] if no_fd else [self.fd(code)]
            return VringFile(self.ring_index() & 0xFF, no_fd), fds
        if code == F.SET_MEM_TABLE:
            pairs = [self.region() for _ in range(d.int(1, 3))]
            return MemTable(tuple(r for r, _ in pairs)), [fd for _, fd in pairs]
        if code == F.ADD_MEM_REG:
            region, fd = self.region()
            return SingleMemRegion(region), [fd]
        if code == F.REM_MEM_REG:
            if self.state.regions and d.bool(0.7):
                region = d.choice(self.state.regions)
            else:
                region = MemRegion(d.int(0, 1 << 32), d.int(1, 1 << 20), d.int(0, 1 << 47), 0)
            return SingleMemRegion(region), ([self.fd(code)] if d.bool(0.2) else [])
        if layout.request is IotlbMsg or code == VR.IOTLB_MSG_ASID:
            kind = d.choice([wire.IotlbType.UPDATE] * 3 + [wire.IotlbType.INVALIDATE,
                            wire.IotlbType.MISS, wire.IotlbType.ACCESS_FAIL])
            msg = IotlbMsg(interesting_u64(d, near), interesting_u64(d), interesting_u64(d, near),
                           wire.IotlbPerm(d.int(0, 3)), kind)
            if code == VR.IOTLB_MSG_ASID:
                return wire.AsidIotlbMsg(d.choice([0, 0, 1, 2, 3, 4, 255, U32_MAX]), msg), []
            return msg, []
        if layout.request is ConfigSpace:
            size = d.choice([0, 1, 4, 8, 60, 256])
            offset = d.int(0, 256 - size)
            return ConfigSpace(offset, size, d.choice([0, 1]), d.bytes(size)), []
        if layout.request is LogDescription:
            return LogDescription(interesting_u64(d), interesting_u64(d)), [self.fd(code)]
        if layout.request is InflightDescription:
            payload = InflightDescription(interesting_u64(d), interesting_u64(d),
                                          d.choice([1, 1, 0, 2, d.int(0, 0xFFFF)]),
                                          d.choice([128, 8, 1024, 0, 3, 2048, d.int(0, 0xFFFF)]))
            return payload, ([self.fd(code)] if code == F.SET_INFLIGHT_FD else [])
        if layout.request is DeviceStateTransfer:
            return DeviceStateTransfer(d.int(0, 1), 0), [self.fd(code)]
        if layout.request is U64:
            return U64(interesting_u64(d)), []
        if layout.request is Empty:
            low, _ = layout.request_fds(Empty())
            return Empty(), [self.fd(code) for _ in range(low)]
        raise AssertionError(f"no generator for {wire.request_name(code)}")

    # -- steps --------------------------------------------------------------
    def valid(self, code: int, need_reply: bool | None = None) -> Step:
        payload, fds = self.payload(code)
        if need_reply is None:
            need_reply = self.d.bool(0.5)
        message = wire.request(code, payload, fds=fds, need_reply=need_reply)
        data, _ = wire.encode_message(message)
        return Step(data, fds, code, message.flags, wire.request_name(code))

    def mutated(self) -> Step:
        d = self.d
        code = d.choice(SESSION_CODES) if d.bool(0.8) else d.choice(UNKNOWN_CODES)
        if code in FRONTEND_LAYOUTS:
            step = self.valid(code)
        else:
            step = Step(struct.pack("<III", code, 1, 0), [], code, 1, f"REQUEST_{code}")
        body = step.data[12:]
        flags = step.flags
        what = d.int(0, 5)
        if what == 0:  # flags
            flags = d.choice([0x1, 0x5, 0x9, 0xD, 0x0, 0x2, 0x3, 0x11, 0x101, d.int(0, U32_MAX)])
        elif what == 1:  # payload cut or grown (header size follows)
            if body and d.bool():
                body = body[: d.int(0, len(body))]
            else:
                body = body + d.bytes(d.int(1, 16))
        elif what == 2:  # payload bytes flipped
            if body:
                i = d.int(0, len(body) - 1)
                body = body[:i] + bytes([body[i] ^ (1 << d.int(0, 7))]) + body[i + 1 :]
        elif what == 3:  # fd count off by some
            if step.fds and d.bool():
                step.fds = step.fds[: d.int(0, len(step.fds) - 1)]
            else:
                more = [self.pool.make(d.choice(FD_KINDS)) for _ in range(d.int(1, 3))]
                step.fds = step.fds + more
        elif what == 4:  # a random code on this payload
            code = d.choice(SESSION_CODES + list(UNKNOWN_CODES))
        else:  # random payload of a random size
            body = d.bytes(d.choice([0, 4, 8, 16, 24, 40, d.int(0, 300)]))
        size = len(body)
        data = struct.pack("<III", code, flags, size) + body
        bad = bool(flags & 3 != 1 or flags & ~0xF or size > 4096 or len(step.fds) > 8)
        label = f"mutated {wire.request_name(code)}"
        return Step(data, step.fds, code, flags, label, framing_bad=bad)

    def final(self) -> Step:
        d = self.d
        what = d.int(0, 3)
        if what == 0:  # truncated: the header promises more than is sent
            step = self.valid(d.choice(SESSION_CODES))
            cut = d.int(1, max(1, len(step.data) - 1))
            return Step(step.data[:cut], step.fds, step.code, step.flags, "truncated", final=True)
        if what == 1:  # garbage
            return Step(d.bytes(d.int(1, 64)), [], -1, 0, "garbage", final=True)
        if what == 2:  # an absurd size
            return Step(struct.pack("<III", F.GET_FEATURES, 1, d.int(4097, U32_MAX)), [], 1, 1,
                        "huge size", framing_bad=True)
        count = d.choice([9, 16, 40])  # an fd flood
        fds = [self.pool.make("eventfd") for _ in range(count)]
        step = self.valid(F.SET_OWNER)
        return Step(step.data, fds, step.code, step.flags, f"{count} fds", framing_bad=True)

    def setup_prefix(self) -> list[Step]:
        """QEMU's bring-up, with elements dropped, repeated or moved."""
        d = self.d
        order = [F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES, F.SET_OWNER,
                 F.SET_BACKEND_REQ_FD, F.SET_FEATURES, F.SET_VRING_CALL, F.SET_VRING_ERR,
                 d.choice([F.SET_MEM_TABLE, F.ADD_MEM_REG]), F.SET_VRING_NUM, F.SET_VRING_BASE,
                 F.SET_VRING_ADDR, F.SET_VRING_KICK, F.SET_VRING_ENABLE, F.SET_STATUS]
        steps = []
        for code in order:
            if d.bool(0.15):
                continue
            if d.bool(0.1) and steps:
                steps.insert(d.int(0, len(steps)), self.valid(code))
            else:
                steps.append(self.valid(code))
        return steps

    def plan(self, max_steps: int = 12) -> list[Step]:
        d = self.d
        steps = self.setup_prefix() if d.bool(0.6) else []
        for _ in range(d.int(0, max_steps)):
            pick = d.int(0, 9)
            if pick <= 5:
                steps.append(self.valid(d.choice(SESSION_CODES)))
            elif pick == 9 and d.bool(0.3) and self.pool.sealable:
                steps.append(Step(b"", [], -1, 0, "the front-end shrinks its memfds",
                                  action=self.pool.shrink_sealable))
            else:
                steps.append(self.mutated())
            if steps[-1].framing_bad:
                break
        else:
            if d.bool(0.2):
                steps.append(self.final())
        return steps


# -- running a plan against the live back-end ----------------------------------------------


class ReplyReader:
    """Reads whole messages from the back-end, with a deadline; any fd is an error."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
            raise Violation(f"no reply and no close within {REPLY_TIMEOUT} s")
        try:
            data, anc, flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except (ConnectionResetError, BrokenPipeError):
            data, anc, flags = b"", [], 0
        fds = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(got)
        wire.close_all(fds)
        if not data:
            self.closed = True
            return
        self.fds += len(fds)  # the back-end writes one message per sendmsg
        self.buffer += data

    fds = 0  # fds that came with the bytes not yet returned
    last_fds = 0

    def next(self, deadline: float) -> tuple[int, int, bytes] | None:
        """(code, flags, payload) or None when the back-end closed; ``last_fds``: its fd count."""
        while True:
            if len(self.buffer) >= 12:
                code, flags, size = struct.unpack_from("<III", self.buffer)
                if len(self.buffer) >= 12 + size:
                    payload = bytes(self.buffer[12 : 12 + size])
                    del self.buffer[: 12 + size]
                    self.last_fds, self.fds = self.fds, 0
                    return code, flags, payload
            if self.closed:
                if self.buffer:
                    raise Violation(f"the back-end closed mid-message ({len(self.buffer)} bytes)")
                return None
            self._fill(deadline)


def check_reply(step: Step, code: int, flags: int, payload: bytes, *, negotiated: int = 0,
                fds: int = 0) -> None:
    if flags != 0x5:
        raise Violation(f"{step.label}: reply flags {flags:#x} (must be exactly 0x5)")
    if code != step.code:
        raise Violation(f"{step.label}: reply carries request code {code}")
    layout = FRONTEND_LAYOUTS.get(code)
    value = layout is not None and layout.reply is not None and step.value_reply(negotiated)
    reply_type = layout.reply if value else U64
    try:
        decoded = reply_type.decode(payload)
    except ValueError as exc:
        raise Violation(f"{step.label}: reply payload does not decode: {exc}") from None
    if value and code == F.SET_DEVICE_STATE_FD:
        check_device_state_fd_reply(step, decoded.value, fds)
        return
    if fds != (REPLY_FDS.get(code, 0) if value else 0):
        raise Violation(f"{step.label}: reply with {fds} fd(s)")
    if reply_type is U64 and code not in REPLY_CODES and decoded.value not in (0, 1):
        raise Violation(f"{step.label}: ack value {decoded.value}")
    if code == F.GET_CONFIG:
        sent = ConfigSpace.decode(memoryview(step.data)[12:])
        same = (decoded.offset, decoded.flags) == (sent.offset, sent.flags)
        if not same or decoded.size not in (0, sent.size):
            raise Violation(f"{step.label}: GET_CONFIG answered {decoded} for {sent}")
    if code in (F.GET_VRING_BASE, VR.GET_VRING_GROUP):
        sent = VringState.decode(memoryview(step.data)[12:])
        if decoded.index != sent.index:
            raise Violation(f"{step.label}: answered for ring {decoded.index}, asked {sent.index}")


def check_device_state_fd_reply(step: Step, value: int, fds: int) -> None:
    if value & ~(DEVICE_STATE_ERROR | DEVICE_STATE_NO_FD):
        raise Violation(f"{step.label}: reply {value:#x} sets undefined bits")
    if value & DEVICE_STATE_ERROR and not value & DEVICE_STATE_NO_FD:
        raise Violation(f"{step.label}: reply {value:#x} is an error that claims an fd")
    if fds != (0 if value & (DEVICE_STATE_ERROR | DEVICE_STATE_NO_FD) else 1):
        raise Violation(f"{step.label}: reply {value:#x} with {fds} fd(s)")


@dataclass
class CaseResult:
    steps: int = 0
    answers: int = 0
    closed_by_backend: bool = False
    reason: str = ""


def raw_header(code: int, payload: bytes = b"", flags: int = 0x1) -> bytes:
    return struct.pack("<III", code, flags, len(payload)) + payload


def send_step(sock: socket.socket, step: Step) -> bool:
    """False when the back-end has already closed the connection."""
    try:
        if step.fds:
            sent = socket.send_fds(sock, [step.data], step.fds)
            if sent < len(step.data):
                sock.sendall(step.data[sent:])
        else:
            sock.sendall(step.data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def protocol_features_of(step: Step, offered_protocol: int) -> int | None:
    """The protocol features a well-formed SET_PROTOCOL_FEATURES sets (a subset of what
    was offered), else None."""
    if (step.code != F.SET_PROTOCOL_FEATURES or step.flags not in (0x1, 0x9) or step.fds
            or step.framing_bad or step.final or len(step.data) != 20):
        return None
    value = struct.unpack_from("<Q", step.data, 12)[0]
    return None if value & ~offered_protocol else value


def run_message_case(backend: LiveBackend, steps: list[Step], offered_features: int,
                     offered_protocol: int) -> CaseResult:
    """Play ``steps`` on a fresh connection; raise ``Violation`` if a property fails."""
    result = CaseResult()
    sock = backend.connect()
    sock.settimeout(REPLY_TIMEOUT)
    reader = ReplyReader(sock)
    negotiated = 0  # protocol features, as the spec says a back-end takes them
    try:
        for step in steps:
            result.steps += 1
            if step.action is not None:
                step.action()
                continue
            accepted = protocol_features_of(step, offered_protocol)
            if not send_step(sock, step) or reader.closed:
                result.closed_by_backend = True
                break
            if step.final:
                break
            deadline = time.monotonic() + REPLY_TIMEOUT
            if step.framing_bad:
                got = reader.next(deadline)
                if got is not None:
                    raise Violation(f"{step.label}: answered {got[:2]} instead of closing")
                result.closed_by_backend = True
                break
            if step.expects_answer(negotiated):
                try:
                    got = reader.next(deadline)
                except Violation as exc:
                    raise Violation(f"{step.label}: {exc}") from None
                if got is None:
                    result.closed_by_backend = True
                    break
                result.answers += 1
                check_reply(step, *got, negotiated=negotiated, fds=reader.last_fds)
            if accepted is not None:
                negotiated = accepted
        else:
            # Barrier: nothing unasked may be waiting before the reply to this.
            barrier = Step(raw_header(F.GET_FEATURES), [], F.GET_FEATURES, 1, "barrier")
            if send_step(sock, barrier):
                got = reader.next(time.monotonic() + REPLY_TIMEOUT)
                if got is None:
                    result.closed_by_backend = True
                else:
                    code, flags, payload = got
                    if code != F.GET_FEATURES:
                        raise Violation(
                            f"unasked message {code} flags {flags:#x} before the barrier reply"
                        )
                    check_reply(barrier, *got, fds=reader.last_fds)
                    if U64.decode(payload).value != offered_features:
                        raise Violation("GET_FEATURES changed its answer")
            else:
                result.closed_by_backend = True
    finally:
        sock.close()
    result.reason = backend.wait_disconnected()
    bugs = list(backend.bug_lines)
    backend.bug_lines.clear()  # each reported once
    if not EXPECTED_DISCONNECTS.search(result.reason):
        raise Violation(f"the back-end dropped the session: {result.reason}")
    if not backend.alive():
        raise Violation(f"the back-end died (exit {backend.process.poll()})\n" + backend.log_tail())
    if bugs:
        raise Violation("bug in the back-end log: " + bugs[0] + "\n" + backend.log_tail())
    return result


# -- rings in memory, in-process ---------------------------------------------------------------

RING_LAYOUT = ((0, 64 << 10), (64 << 10, 64 << 10), (1 << 20, 64 << 10))  # two adjacent + a hole
RING_AREA = 32 << 10  # region 0 [0, 32 KiB): rings; everything else: buffers
SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


@dataclass
class ChainOutcome:
    results: collections.Counter = field(default_factory=collections.Counter)


class RingRig:
    """Guest RAM (memfd regions), the back-end's view of it, a blk device on an image."""

    def __init__(self, image_path: Path, image_size: int = 64 << 10) -> None:
        self.image_path = Path(image_path)
        self.image_path.write_bytes(os.urandom(image_size))
        self.ram = GuestRam(RING_LAYOUT, separate_fds=True)
        self.memory = GuestMemory()
        for r in self.ram.regions:
            self.memory.add(map_region(r.fd, r.gpa, r.size, r.user_addr, r.mmap_offset))
        # Host address ranges of every mapped region: each view must lie in one.
        self.host_ranges = []
        self.mappings = []
        for region in self.memory.regions:
            base = _address(region._view)
            self.host_ranges.append((base, base + region.size))
            self.mappings.append(region._mapping)
        self.device = BlkDevice(os.fspath(self.image_path))
        self.capacity = self.device.capacity_sectors
        self.image_fd = os.open(self.image_path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self.device.close()
        os.close(self.image_fd)
        self.memory.clear()
        self.ram.close()

    def image(self) -> bytes:
        return os.pread(self.image_fd, self.capacity * SECTOR, 0)

    def check_view(self, view: memoryview) -> None:
        if not any(view.obj is m for m in self.mappings):
            raise Violation(f"a view of {type(view.obj).__name__}, not of a guest memory mapping")
        start = _address(view)
        end = start + view.nbytes
        if not any(lo <= start and end <= hi for lo, hi in self.host_ranges):
            raise Violation(f"view {start:#x}+{view.nbytes:#x} outside every mapped region")


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class ChainPlanner:
    """Writes one random ring (descriptors, avail ring, indices) into guest RAM."""

    def __init__(self, d, rig: RingRig) -> None:
        self.d = d
        self.rig = rig
        self.ram = rig.ram

    def buffer_gpa(self, length: int) -> int:
        d = self.d
        kind = d.int(0, 19)
        if kind == 0:
            return d.choice([U64_MAX - 7, 1 << 63, (1 << 20) + (64 << 10) - 8, 0x80000, 2 << 20])
        if kind == 1:
            return d.int(0, RING_AREA - 16)  # inside the rings
        if kind == 2:  # straddling the region 0/1 boundary
            return (64 << 10) - d.int(1, max(1, min(length, 4096)))
        region = d.choice(self.ram.regions)
        lo = region.gpa + (RING_AREA if region.index == 0 else 0)
        hi = region.gpa_end - max(1, min(length, 4096))
        return d.int(lo, max(lo, hi))

    def request(self) -> tuple[list[tuple[int, int, bool]], int]:
        """Segments (gpa, length, writable) of a plausible blk request, and its type."""
        d = self.d
        kind = d.choice([T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ, 10, 14,
                         d.int(0, U32_MAX)])
        cap = self.rig.capacity
        sector = d.choice([0, 1, cap - 1, cap, cap + 1, d.int(0, cap), d.int(0, U64_MAX)])
        header = self.buffer_gpa(16)
        self.ram_write(header, struct.pack("<IIQ", kind, 0, sector))
        segs = [(header, d.choice([16, 16, 16, 8, 20, 0]), False)]
        data_len = d.choice([0, SECTOR, 2 * SECTOR, 8 * SECTOR, 100, 4096 + 512, d.int(0, 20000)])
        writable = kind in (T_IN, T_GET_ID) if not d.bool(0.1) else d.bool()
        if kind in (T_DISCARD, T_WZ):
            data_len = d.choice([16, 16, 16, 32, 8])
            payload = b"".join(
                struct.pack("<QII",
                            d.choice([0, 1, cap - 8, d.int(0, cap), cap, d.int(0, U64_MAX)]),
                            d.choice([1, 8, d.int(1, 16), 0, cap, 1 << 22, U32_MAX]),
                            d.choice([0, 0, 1, 2]))
                for _ in range(data_len // 16 + 1)
            )[:data_len]
            gpa = self.buffer_gpa(data_len)
            self.ram_write(gpa, payload)
            segs.append((gpa, data_len, False))
        elif data_len:
            pieces = d.int(1, 3)
            left = data_len
            for i in range(pieces):
                take = left if i == pieces - 1 else d.int(0, left)
                left -= take
                gpa = self.buffer_gpa(take)
                segs.append((gpa, take, writable))
        status = self.buffer_gpa(1)
        segs.append((status, d.choice([1, 1, 1, 2, 0]), True))
        return segs, kind

    def ram_write(self, gpa: int, data: bytes) -> None:
        try:
            self.ram.write(gpa, data)  # may straddle two adjacent regions
        except GuestRamError:
            pass  # outside guest RAM: the descriptor points at nothing

    def build(self) -> tuple[SplitQueue | None, int, str]:
        """Write the ring; return the queue (None if activation refused), its size, a label."""
        d = self.d
        size = d.choice([1, 2, 4, 8, 16, 64, 256])
        desc_gpa, avail_gpa = 0, 16 * size
        used_gpa = (avail_gpa + 6 + 2 * size + 3) & ~3
        ram = self.ram
        ram.fill(0, RING_AREA, 0)
        # Buffers start with a recognisable fill so a written status byte shows.
        for region in ram.regions:
            lo = region.gpa + (RING_AREA if region.index == 0 else 0)
            ram.fill(lo, region.gpa_end - lo, 0xEE)
        table = [(0, 0, 0, 0)] * size
        free = list(range(size))
        heads = []
        indirect_ok = d.bool(0.7)
        for _ in range(d.int(0, size + 1)):
            segs, _kind = self.request()
            if d.bool(0.25) and indirect_ok or d.bool(0.05):  # an indirect table
                if not free:
                    break
                head = free.pop(0)
                tgpa = self.buffer_gpa(16 * len(segs))
                entries = b"".join(
                    DESC.pack(a, n, (F_WRITE if w else 0) | (F_NEXT if i < len(segs) - 1 else 0),
                              i + 1)
                    for i, (a, n, w) in enumerate(segs)
                )
                self.ram_write(tgpa, entries)
                flags = F_INDIRECT
                if d.bool(0.05):
                    flags |= F_NEXT
                length = 16 * len(segs) + d.choice([0, 0, 0, 8, 16, -16])
                table[head] = (tgpa, max(0, length), flags, 0)
                heads.append(head)
                continue
            if len(free) < len(segs):
                break
            ids = [free.pop(0) for _ in segs]
            for i, (a, n, w) in enumerate(segs):
                last = i == len(segs) - 1
                table[ids[i]] = (a, n, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                                 0 if last else ids[i + 1])
            heads.append(ids[0])
        # Mutations: loops, bad next, flags, lengths, addresses, nested indirect.
        for _ in range(d.choice([0, 0, 0, 1, 2, 5])):
            i = d.int(0, size - 1)
            a, n, f, nx = table[i]
            what = d.int(0, 6)
            if what == 0:
                nx, f = d.int(0, size - 1), f | F_NEXT  # possibly a loop
            elif what == 1:
                nx, f = d.choice([size, 0xFFFF, d.int(0, 0xFFFF)]), f | F_NEXT
            elif what == 2:
                f ^= 1 << d.int(0, 3)
            elif what == 3:
                n = d.choice([0, 1, U32_MAX, 1 << 31, d.int(0, U32_MAX)])
            elif what == 4:
                a = d.choice([U64_MAX, U64_MAX - 15, 1 << 40, 0x3000_0000, d.int(0, U64_MAX)])
            elif what == 5:  # an indirect table naming itself, or the ring
                a, n, f = d.choice([desc_gpa, 0]), 16 * d.int(1, size), F_INDIRECT | (f & F_NEXT)
            else:
                f |= F_INDIRECT
            table[i] = (a, n, f, nx)
        ram.write(desc_gpa, b"".join(DESC.pack(*t) for t in table))
        start = d.choice([0, 0, 65535, 65534, 65536 - size, d.int(0, 65535)])
        avail = [(h if not d.bool(0.03) else d.choice([size, 0xFFFF])) for h in heads]
        for k, head in enumerate(avail):
            ram.write(avail_gpa + 4 + 2 * ((start + k) % size), struct.pack("<H", head))
        idx = (start + len(avail)) & 0xFFFF
        if d.bool(0.1):
            idx = d.choice([d.int(0, 65535), (start + size + 1) & 0xFFFF, start])
        ram.write(avail_gpa + 2, struct.pack("<H", idx))
        ram.write(used_gpa + 2, struct.pack("<H", start if not d.bool(0.1) else d.int(0, 65535)))
        config = QueueConfig(
            0, size=size if not d.bool(0.02) else d.choice([0, 3, 65536]),
            desc_addr=ram.uva(desc_gpa) + (0 if not d.bool(0.02) else 8),
            avail_addr=ram.uva(avail_gpa), used_addr=ram.uva(used_gpa), base=start,
        )
        try:
            queue = SplitQueue(config, DirectSpace(self.rig.memory, "uva"),
                               DirectSpace(self.rig.memory, "gpa"),
                               event_idx=d.bool(), indirect=indirect_ok)
        except InvalidQueueConfig as exc:
            return None, size, normalise(f"InvalidQueueConfig: {exc}")
        return queue, size, f"{len(heads)} chains"


TYPE_NAMES = {T_IN: "IN", T_OUT: "OUT", T_FLUSH: "FLUSH", T_GET_ID: "GET_ID", T_DISCARD: "DISCARD",
              T_WZ: "WRITE_ZEROES"}
CHAIN_SECONDS = 1.0  # a pop + process may take this long at most


def run_chain_case(rig: RingRig, d, outcome: ChainOutcome | None = None) -> ChainOutcome:
    """One random ring drained through pop / process / push_used, with the oracles."""
    outcome = outcome or ChainOutcome()
    queue, size, label = ChainPlanner(d, rig).build()
    if queue is None:
        outcome.results[label] += 1
        return outcome
    before = rig.image()
    for _ in range(4 * size + 4):
        started = time.perf_counter()
        try:
            chain = queue.pop()
        except (BadChain, QueueCorrupted) as exc:
            outcome.results[normalise(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")] += 1
            break
        if chain is None:
            break
        for view in chain.readable + chain.writable:
            rig.check_view(view)
        if sum(v.nbytes for v in chain.readable) != chain.readable_len:
            raise Violation("readable views do not add up to readable_len")
        if sum(v.nbytes for v in chain.writable) != chain.writable_len:
            raise Violation("writable views do not add up to writable_len")
        readable = b"".join(bytes(v) for v in chain.readable)
        written = rig.device.process(0, chain)
        queue.push_used(chain.head, written)
        elapsed = time.perf_counter() - started
        if elapsed > CHAIN_SECONDS:
            raise Violation(f"pop + process took {elapsed:.2f} s")
        if written > chain.writable_len:
            raise Violation(f"used length {written} > writable length {chain.writable_len}")
        status = chain.writable[-1][-1] if chain.writable else None
        after = rig.image()
        kind = struct.unpack_from("<I", readable)[0] if len(readable) >= 16 else None
        check_image(before, after, kind, readable, status, rig.capacity)
        outcome.results[f"completed {TYPE_NAMES.get(kind, 'other')} status "
                        f"{'none' if status is None or status == 0xEE else status}"] += 1
        before = after
    return outcome


def check_image(before: bytes, after: bytes, kind: int | None, readable: bytes,
                status: int | None, capacity: int) -> None:
    """The image changes only as a successful OUT / WRITE_ZEROES / DISCARD says."""
    if before == after:
        return
    if status != 0 or kind not in (T_OUT, T_DISCARD, T_WZ):
        raise Violation(f"image changed by a request of type {kind} with status {status}")
    sector = struct.unpack_from("<Q", readable, 8)[0]
    if kind == T_OUT:
        data = readable[16:]
        start = sector * SECTOR
        expected = before[:start] + data + before[start + len(data):]
        if after != expected:
            raise Violation(f"OUT at sector {sector} of {len(data)} bytes wrote something else")
        return
    seg_sector, count, _flags = struct.unpack_from("<QII", readable, 16)
    lo, hi = seg_sector * SECTOR, (seg_sector + count) * SECTOR
    if before[:lo] != after[:lo] or before[hi:] != after[hi:]:
        raise Violation(f"{TYPE_NAMES[kind]} of sectors {seg_sector}+{count} changed bytes outside")
    if kind == T_WZ and after[lo:hi] != bytes(hi - lo):
        raise Violation(f"WRITE_ZEROES of sectors {seg_sector}+{count} left non-zero bytes")


def learn_offers(socket_path: Path) -> tuple[int, int]:
    """What the back-end offers (GET_FEATURES, GET_PROTOCOL_FEATURES), as a front-end learns it."""
    from pyvhost_user.frontend import Frontend

    with Frontend.connect(socket_path) as fe:
        return fe.get_features(), fe.get_protocol_features()


# (title, lines) the fuzz tests hand to the terminal summary (conftest.py)
REPORTS: list[tuple[str, list[str]]] = []


def summary(counter: collections.Counter, title: str, limit: int = 80) -> list[str]:
    lines = [f"{title}: {sum(counter.values())} in {len(counter)} kinds"]
    for text, count in counter.most_common(limit):
        lines.append(f"  {count:8d}  {text}")
    return lines


def read_check(backend: LiveBackend, expected: bytes) -> None:
    """A fresh front-end connects and reads correct data."""
    from pyvhost_user.frontend import BlkDriver

    backend.sessions += 1
    with BlkDriver.connect(backend.socket_path) as driver:
        got = driver.read(0, len(expected))
    if got != expected:
        raise Violation("a fresh front-end read wrong data")
    backend.wait_disconnected()
