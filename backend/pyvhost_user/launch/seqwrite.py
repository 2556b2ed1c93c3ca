"""The host side of the guest's ``seqwrite`` step: records, acks, image checks.

The guest (guest-images/init.sh, step ``seqwrite``) writes record ``i`` at
the 4 KiB block ``first + i`` with O_DIRECT and prints ``PVU-ACK i`` once
its ``dd`` returned, i.e. once the device completed the write. A record is
256 lines of 16 bytes, ``R%08d.L%03d.\\n`` (record number, line number):
every 512-byte sector of it names the record and its place, so a sector
from another record, another place or the old content is caught.

``check_image`` classifies every block of the record range against the
record and the content the block had before the run: ``new`` (exactly the
record), ``old`` (exactly the old content), anything else is ``torn``. An
acknowledged record that is not ``new`` is ``lost``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

BLOCK_SIZE = 4096
SECTOR_SIZE = 512
LINE_SIZE = 16
LINES = BLOCK_SIZE // LINE_SIZE

_ACK = re.compile(r"PVU-ACK (\d+)\b")


def record(i: int) -> bytes:
    """The 4 KiB record number ``i`` exactly as the guest writes it."""
    if not 0 <= i < 10**8:
        raise ValueError(f"record number {i} out of range")
    return b"".join(b"R%08d.L%03d.\n" % (i, line) for line in range(LINES))


def records(count: int) -> bytes:
    """Records 0 .. count-1, back to back (what the guest reads back)."""
    return b"".join(record(i) for i in range(count))


def seqwrite_args(count: int, *, first: int = 0, jobs: int = 1, load: bool = False) -> dict:
    """Machine(guest_args=...) words for the ``seqwrite`` step."""
    return {"pvu_seq_count": count, "pvu_seq_first": first, "pvu_seq_jobs": jobs,
            "pvu_seq_load": int(load)}


def parse_acks(text: str) -> list[int]:
    """Record numbers the guest acknowledged (``PVU-ACK i``), in console order."""
    return [int(m.group(1)) for m in _ACK.finditer(text.replace("\r", ""))]


def ack_count(text: str) -> int:
    return len(_ACK.findall(text))


@dataclass
class SeqCheck:
    """What the record range of an image holds, block by block (record numbers)."""

    count: int
    acked: set[int]
    new: list[int] = field(default_factory=list)     # exactly the record
    old: list[int] = field(default_factory=list)     # exactly the old content
    torn: list[int] = field(default_factory=list)    # neither: a mix, or garbage
    lost: list[int] = field(default_factory=list)    # acked, yet not the record
    details: dict[int, str] = field(default_factory=dict)   # torn/lost: sector map

    @property
    def ok(self) -> bool:
        return not self.torn and not self.lost

    @property
    def landed_unacked(self) -> list[int]:
        """Records on the image whose ack the guest has not printed (yet)."""
        return [i for i in self.new if i not in self.acked]

    def describe(self, limit: int = 8) -> str:
        parts = [f"{self.count} blocks: {len(self.new)} new ({len(self.acked)} acked, "
                 f"{len(self.landed_unacked)} landed unacked), {len(self.old)} old, "
                 f"{len(self.torn)} torn, {len(self.lost)} lost"]
        for name in ("lost", "torn"):
            blocks = getattr(self, name)
            for i in blocks[:limit]:
                parts.append(f"{name} record {i}: {self.details.get(i, '')}")
        return "\n".join(parts)


def _sector_map(got: bytes, want: bytes, old: bytes) -> str:
    """One letter per 512-byte sector: N record, O old, X neither."""
    out = []
    for s in range(0, BLOCK_SIZE, SECTOR_SIZE):
        g = got[s:s + SECTOR_SIZE]
        out.append("N" if g == want[s:s + SECTOR_SIZE]
                   else "O" if g == old[s:s + SECTOR_SIZE] else "X")
    return "sectors " + "".join(out) + f" (starts {got[:LINE_SIZE]!r})"


def check_blocks(data: bytes, old: bytes, count: int, acked: Iterable[int]) -> SeqCheck:
    """Check ``count`` blocks: ``data`` the record range now, ``old`` before the run."""
    need = count * BLOCK_SIZE
    if len(data) < need or len(old) < need:
        raise ValueError(f"need {need} bytes of both, got {len(data)} and {len(old)}")
    acked = set(acked)
    bad_acks = sorted(i for i in acked if not 0 <= i < count)
    if bad_acks:
        raise ValueError(f"acks for records outside 0..{count - 1}: {bad_acks[:8]}")
    check = SeqCheck(count, acked)
    for i in range(count):
        off = i * BLOCK_SIZE
        got, was, want = data[off:off + BLOCK_SIZE], old[off:off + BLOCK_SIZE], record(i)
        if got == want:
            check.new.append(i)
            continue
        if got == was:
            check.old.append(i)
        else:
            check.torn.append(i)
        if i in acked:
            check.lost.append(i)
        if i in acked or got != was:
            check.details[i] = _sector_map(got, want, was)
    return check


def read_range(path: str | os.PathLike, first: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(first * BLOCK_SIZE)
        return f.read(count * BLOCK_SIZE)


def check_image(path: str | os.PathLike, old_image: bytes, first: int, count: int,
                acked: Iterable[int]) -> SeqCheck:
    """check_blocks() of the record range of the image at ``path``;
    ``old_image``: the whole image as it was before the run."""
    start = first * BLOCK_SIZE
    return check_blocks(read_range(path, first, count),
                        old_image[start:start + count * BLOCK_SIZE], count, acked)
