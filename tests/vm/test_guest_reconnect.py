"""Reconnect without lost I/O: our back-end crashes mid-I/O, again and again.

A real guest (QEMU 7.2 and 10.0, TCG) writes sequence-numbered 4 KiB records
with O_DIRECT from several writers at once, with reads kept in flight beside
them (init.sh step ``seqwrite``), and prints ``PVU-ACK i`` for every write
the device completed. The test SIGKILLs our back-end (by its pid) a few times,
spaced by the acks it sees on the serial console, and starts a new one on the
same socket; QEMU (``-chardev socket,...,reconnect=1``) reconnects, repeats the
handshake and resumes the ring where the used index says.

Checked from the host, on the image: at every crash, each record acked so far
holds exactly its record and every other block holds its old content or its
whole record, never a mix; at the end every record is there and nothing
outside the records changed. From the guest: every record acked exactly once,
and its O_DIRECT read-back of the range matches, by content and by md5. From
the ring (guest memory, read through QEMU's monitor): each new back-end gets
SET_VRING_BASE = the used index the dead one left. The crashes differ (see
CRASH_PLAN); run with -s for a summary of each.
"""

from __future__ import annotations

import hashlib
import re
import signal
import time
from dataclasses import dataclass, field

import pytest
from pyvhost_user.launch import SUPPORTED_VERSIONS as QEMU_VERSIONS
from pyvhost_user.launch import VhostUserBlk
from pyvhost_user.launch.backends import (
    BackendProcess,
    freeze_backend,
    frozen_busy,
    frozen_threads,
    kill_backend,
    restart_backend,
    start_backend,
    thaw_backend,
)
from pyvhost_user.launch.seqwrite import (
    BLOCK_SIZE,
    SeqCheck,
    ack_count,
    check_blocks,
    check_image,
    parse_acks,
    record,
    records,
    seqwrite_args,
)

DISK_MIB = 16
RECORDS = 480
FIRST = 256         # record 0 at 1 MiB: the partition table and the tail stay untouched
JOBS = 4            # parallel writers: up to 4 writes in flight, besides the reads
# After a restart: a new process (about 1 s of Python start-up on an idle 2-core
# machine), QEMU's next reconnect attempt (every second), the handshake, then
# requests again.
RESUME_TIMEOUT = 40.0
QEMU_NOTICE_TIMEOUT = 10.0
# A 7.2 front-end never recovers from a connection lost mid-handshake: never
# kill before the new back-end completed this many more acks than were printed
# when the old one died (a writer prints at most one ack the dead one completed).
RESUMED_ACKS = JOBS + 2

# How each crash goes: (how, restart only after QEMU saw the disconnect).
#   "now":     SIGKILL the moment the acks reach the mark, whatever it is doing
#              (mostly waiting: the guest, not the back-end, is the slow side).
#   "backlog": SIGSTOP, wait until every writer has a write in the ring, SIGKILL:
#              requests outstanding for sure.
#   "busy":    SIGSTOP, SIGCONT, ... until a thread of the back-end is caught at
#              work (user mode or image I/O; x86_64) with a request outstanding,
#              then SIGKILL: likely with a request taken and not completed (the
#              next back-end's "inflight buffer set" line says, when it tracks
#              them). Chance-based: when nothing is caught within BUSY_TIMEOUT the
#              kill happens anyway (the summary says).
CRASH_PLAN = [("now", False), ("backlog", True), ("busy", False), ("now", True),
              ("busy", True)]
FROZEN_BACKLOG = JOBS
BUSY_TIMEOUT = 10.0


@dataclass
class Crash:
    """One SIGKILL and what came of it."""

    number: int
    how: str
    waited_for_qemu: bool
    caught_busy: bool = False
    busy_syscalls: list[int] = field(default_factory=list)   # -1: user mode
    seen_syscalls: set[int] = field(default_factory=set)     # while looking for busy
    acks: int = 0                   # acks on the console once the back-end was dead
    check: SeqCheck | None = None   # the image right then
    avail: int = 0                  # the ring's avail and used index (guest memory)
    used: int = 0
    qemu_lines: list[str] = field(default_factory=list)   # QEMU's output since the kill
    resumed_acks: int = 0

    @property
    def outstanding(self) -> int:
        return (self.avail - self.used) & 0xFFFF

    def line(self) -> str:
        c = self.check
        if c is None:
            return f"crash {self.number} ({self.how}): the test stopped before the image check"
        how = {"now": "SIGKILL", "backlog": "frozen with a backlog, SIGKILL",
               "busy": (f"frozen busy (syscalls {self.busy_syscalls}), SIGKILL" if self.caught_busy
                        else "frozen, NOT caught busy (saw syscalls "
                        f"{sorted(self.seen_syscalls)}), SIGKILL")
               }[self.how]
        restart = "after QEMU saw the disconnect" if self.waited_for_qemu else "at once"
        return (f"crash {self.number} ({how}; restart {restart}): {self.acks} acks, ring "
                f"avail {self.avail} used {self.used} ({self.outstanding} outstanding); image "
                f"{len(c.new)} new ({len(c.landed_unacked)} landed unacked), {len(c.old)} old, "
                f"{len(c.torn)} torn, {len(c.lost)} lost; resumed at {self.resumed_acks} acks")


_MSG = re.compile(r"<- ([A-Z_]+)( reply)?")
_VRING_BASE = re.compile(r"<- SET_VRING_BASE index=0 num=(\d+)")
_INFLIGHT = re.compile(r"inflight buffer.*")
_MEM_REGION = re.compile(r"guest_phys_addr=(0x[0-9a-f]+|\d+) size=(0x[0-9a-f]+|\d+) "
                         r"user_addr=(0x[0-9a-f]+|\d+)")
_VRING_ADDR = re.compile(r"<- SET_VRING_ADDR index=0 .*?used_user_addr=(0x[0-9a-f]+) "
                         r"avail_user_addr=(0x[0-9a-f]+)")


def handshake(log: str) -> dict:
    """What a back-end got from QEMU: messages in order (runs folded), the
    SET_VRING_BASE values of ring 0 and the inflight lines."""
    names: list[str] = []
    for m in _MSG.finditer(log):
        if m.group(2):
            continue
        if names and names[-1].split(" x")[0] == m.group(1):
            base, _, n = names[-1].partition(" x")
            names[-1] = f"{base} x{int(n or 1) + 1}"
        else:
            names.append(m.group(1))
    return {"messages": names,
            "vring_base": [int(v) for v in _VRING_BASE.findall(log)],
            "inflight": _INFLIGHT.findall(log)}


def ring0_index_gpas(log: str) -> tuple[int, int]:
    """Guest physical addresses of ring 0's avail and used index, from a
    back-end's trace (its last SET_VRING_ADDR, through the memory regions)."""
    regions = [tuple(int(v, 0) for v in m.groups()) for m in _MEM_REGION.finditer(log)]
    addrs = _VRING_ADDR.findall(log)
    assert regions and addrs, "no memory region or SET_VRING_ADDR in the trace"
    used_ua, avail_ua = (int(v, 16) for v in addrs[-1])

    def gpa(ua: int) -> int:
        for guest_phys, size, user in regions:
            if user <= ua < user + size:
                return guest_phys + ua - user
        raise AssertionError(f"ring address {ua:#x} in no memory region")
    return gpa(avail_ua) + 2, gpa(used_ua) + 2     # idx follows the u16 flags


@pytest.fixture
def backends(request):
    """Every back-end process of the test, in start order; the failure report
    shows their logs; teardown stops any still running."""
    started: list[BackendProcess] = []
    request.node.started_backends = started
    yield started
    for b in started:
        if b.alive():
            b.process.send_signal(signal.SIGCONT)   # one we froze, if the test failed
            b.stop()


@pytest.mark.vm
@pytest.mark.timeout(150)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_backend_killed_mid_io_reconnects_without_lost_writes(
        qemu_version, disk_image, sock_dir, tmp_path, backends, machine_factory):
    image = disk_image(DISK_MIB)
    before = image.read()
    socket_path = sock_dir / "blk.sock"
    backends.append(start_backend("pyvhost", image, socket_path,
                                  log_path=tmp_path / "backend0.log"))

    m = machine_factory(qemu_version, [VhostUserBlk(socket_path, reconnect=1)],
                        steps=["seqwrite"],
                        guest_args=seqwrite_args(RECORDS, first=FIRST, jobs=JOBS, load=True))

    crashes: list[Crash] = []
    try:
        _crash_and_check(image, before, socket_path, tmp_path, backends, m, crashes)
    finally:
        print(summary(qemu_version, m, crashes, backends))
    # Every new back-end got the ring back from QEMU, at the used index the
    # dead one left in guest memory.
    for crash, b in zip(crashes, backends[1:]):
        bases = handshake(b.log())["vring_base"]
        assert bases, f"back-end {crash.number} got no SET_VRING_BASE:\n{b.log()[-3000:]}"
        assert bases[0] == crash.used, (
            f"crash {crash.number}: SET_VRING_BASE {bases[0]}, the used index was {crash.used}")


def summary(qemu_version, m, crashes, backends) -> str:
    lines = [f"QEMU {qemu_version}: {len(crashes)} crashes, {RECORDS} records, "
             f"up {m.uptime():.1f} s"]
    for crash, b in zip(crashes, backends[1:]):
        h = handshake(b.log())
        lines.append(crash.line())
        lines.append(f"  QEMU: {' | '.join(crash.qemu_lines) or '(nothing)'}")
        lines.append(f"  back-end {crash.number}: SET_VRING_BASE {h['vring_base']}; "
                     f"{'; '.join(h['inflight']) or 'no inflight lines'}")
        lines.append(f"  messages: {', '.join(h['messages'])}")
    return "\n".join(lines)


def _crash_and_check(image, before, socket_path, tmp_path, backends, m,
                     crashes: list[Crash]) -> None:
    """The crashes (CRASH_PLAN), then the guest's and the host's checks."""
    def ring() -> tuple[int, int]:
        avail_gpa, used_gpa = ring0_index_gpas(backends[0].log())
        return m.read_phys_u16(avail_gpa)[0], m.read_phys_u16(used_gpa)[0]

    resumed_at = 0
    for k, (how, wait_qemu) in enumerate(CRASH_PLAN):
        crash = Crash(k + 1, how, wait_qemu)
        target = max(RECORDS * (k + 1) // (len(CRASH_PLAN) + 1), resumed_at)

        def progress(text: str, target=target) -> bool:
            return ack_count(text) >= target
        progress.__name__ = f"{target} acks"
        m.wait_for(progress, timeout=RESUME_TIMEOUT)

        victim = backends[-1]
        qemu_lines_before = len(m.qemu_output().splitlines())
        if how == "backlog":
            freeze_backend(victim)

            def backlog(crash=crash) -> bool:
                crash.avail, crash.used = ring()
                return crash.outstanding >= FROZEN_BACKLOG
            _poll(backlog, QEMU_NOTICE_TIMEOUT)
            assert crash.outstanding >= 1, f"crash {k + 1}: nothing in the ring"
        elif how == "busy":
            give_up_at = target + RECORDS // (len(CRASH_PLAN) + 1) // 2

            def caught(victim=victim, crash=crash, give_up_at=give_up_at) -> bool | None:
                if ack_count(m.serial_text()) >= give_up_at:
                    return None     # the next mark is near: kill now, uncaught
                freeze_backend(victim)
                busy = _poll(lambda: frozen_busy(victim) is not None, 2.0, 0.001)
                if busy:
                    crash.seen_syscalls.update((frozen_threads(victim) or {}).values())
                    crash.busy_syscalls = frozen_busy(victim) or []
                    if crash.busy_syscalls:
                        # Mid-request needs a request not completed yet.
                        crash.avail, crash.used = ring()
                        if crash.outstanding:
                            return True
                thaw_backend(victim)
                return False
            crash.caught_busy = bool(_poll(caught, BUSY_TIMEOUT, 0.002, stop_on_none=True))
        code = kill_backend(victim)
        assert code == -9, f"back-end {victim.pid} ended with {code} before the kill"
        if not (how == "backlog" or crash.caught_busy):
            crash.avail, crash.used = ring()    # used: final; avail: may have grown since
        # The dead back-end can write nothing more: the image is what the guest
        # can rely on now. Acks read after the death cover at least every write
        # the guest had seen completed by then.
        acked = parse_acks(m.serial_text())
        crash.acks = len(acked)
        assert crash.acks < RECORDS, m.describe(
            f"the guest wrote every record before crash {k + 1}: make RECORDS larger")
        crash.check = check_image(image, before, FIRST, RECORDS, acked)
        crashes.append(crash)
        assert crash.check.ok, f"crash {k + 1}:\n{crash.check.describe()}"

        def qemu_new_lines() -> list[str]:
            return m.qemu_output().splitlines()[qemu_lines_before:]
        if wait_qemu:
            # The socket stays away until QEMU has seen the disconnect: the guest
            # stalls, QEMU's reconnect attempts find nothing for a while.
            _poll(lambda: any("ring restore failed" in line for line in qemu_new_lines()),
                  QEMU_NOTICE_TIMEOUT)
        backends.append(restart_backend(victim, log_path=tmp_path / f"backend{k + 1}.log"))

        new = backends[-1]
        resumed_at = crash.acks + RESUMED_ACKS

        def resumed(text: str, new=new, resumed_at=resumed_at) -> bool:
            return (ack_count(text) >= min(resumed_at, RECORDS)
                    and "<- SET_VRING_KICK" in new.log())
        resumed.__name__ = f"SET_VRING_KICK to back-end {k + 1} and {resumed_at} acks"
        m.wait_for(resumed, timeout=RESUME_TIMEOUT)
        crash.resumed_acks = ack_count(m.serial_text())
        crash.qemu_lines = qemu_new_lines()
        assert new.alive(), f"back-end {k + 1} died:\n{new.log()[-3000:]}"

    [boot] = m.wait_for_done(timeout=90)
    assert m.wait_exit(30) == 0
    final = backends[-1]
    assert final.stop() == 0, f"last back-end on SIGTERM:\n{final.log()[-3000:]}"
    assert not socket_path.exists()

    # Guest: every record acked once, nothing failed, its read-back is the records.
    assert boot.done and not boot.errors, m.describe(f"guest errors: {boot.errors}")
    acked = parse_acks(m.serial_text())
    assert sorted(acked) == list(range(RECORDS)), "records not acked exactly once"
    assert boot["seqwrite"] == "ok"
    assert boot["seqwrite_verify"] == "ok", boot.get("seqwrite_bad")
    want_md5 = hashlib.md5(records(RECORDS)).hexdigest()
    assert boot["seqwrite_md5"] == want_md5

    # Host: every record on the image, nothing else changed.
    end = check_image(image, before, FIRST, RECORDS, acked)
    assert end.ok and len(end.new) == RECORDS, end.describe()
    after = image.read()
    lo, hi = FIRST * BLOCK_SIZE, (FIRST + RECORDS) * BLOCK_SIZE
    assert after[:lo] == before[:lo] and after[hi:] == before[hi:], "writes outside the records"
    assert image.md5(lo, hi - lo) == want_md5


def _poll(fn, timeout: float, interval: float = 0.05, *, stop_on_none: bool = False):
    """fn() until truthy (or None, with ``stop_on_none``) or ``timeout`` s; its
    last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or (stop_on_none and value is None) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---- the record format and the image check, without QEMU ------------------------

def test_record_format():
    r = record(12)
    assert len(r) == BLOCK_SIZE
    assert r.startswith(b"R00000012.L000.\n") and r.endswith(b"R00000012.L255.\n")
    assert records(3)[BLOCK_SIZE:2 * BLOCK_SIZE] == record(1)
    assert parse_acks("x PVU-ACK 3\r\nPVU-ACK 1\nPVU-ACKNOWLEDGE\n") == [3, 1]
    assert ack_count("PVU-ACK 3\nPVU-ACK 10\n") == 2


def test_check_blocks_classifies_new_old_torn_lost():
    old = bytes(range(256)) * 16 * 5
    data = bytearray(old)
    data[0:BLOCK_SIZE] = record(0)                              # new, acked
    data[BLOCK_SIZE:2 * BLOCK_SIZE] = record(1)                 # new, not acked yet
    torn = record(3)[:1024] + old[3 * BLOCK_SIZE + 1024:4 * BLOCK_SIZE]
    data[3 * BLOCK_SIZE:4 * BLOCK_SIZE] = torn                  # a mix, not acked
    check = check_blocks(bytes(data), old, 5, acked=[0, 4])     # 4 acked but old: lost
    assert check.new == [0, 1] and check.old == [2, 4]
    assert check.torn == [3] and check.lost == [4]
    assert check.landed_unacked == [1]
    assert check.details[3].startswith("sectors NNOOOOOO")
    assert not check.ok
    assert check_blocks(bytes(data), old, 3, acked=[0]).ok
    with pytest.raises(ValueError):
        check_blocks(bytes(data), old, 5, acked=[7])
