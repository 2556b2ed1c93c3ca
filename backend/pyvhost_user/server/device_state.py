"""The device state stream of ``VHOST_USER_SET_DEVICE_STATE_FD``: its bytes, both ways.

Sans-IO: ``encode`` turns a ``DeviceState`` into bytes, ``decode`` checks bytes
and turns them back, raising ``DeviceStateError`` with the first thing wrong.
The front-end carries the stream without looking into it (QEMU puts it in its
migration stream), possibly to a back-end of another version, so it describes
itself: a magic, a version, its own length and a checksum, then typed sections.

Layout, little endian::

  header, 24 bytes
     0  8  magic         b"PVUDEVST"
     8  2  u16 version   1
    10  2  u16 header    24, the size of this header
    12  4  u32 body      bytes after the header
    16  4  u32 crc32     of the body (zlib.crc32)
    20  4  u32 sections  how many follow
  body: sections, back to back
     u16 type, u16 flags, u32 size, then ``size`` bytes
     flags bit 0 OPTIONAL: a reader that does not know the type skips it;
     an unknown type without it makes the stream unreadable.

Section types of version 1, each at most once:

``DEVICE`` (1, required)
  UTF-8 JSON object: the device's ``export_state()`` (devices/base.py).

``ADDRESS_SPACES`` (2, present when the source's front-end negotiated the
address-space extension; memory/iotlb_state.py says what the values mean)
  ``u32 asids, u32 groups``; per group ``u32 asid`` it is bound to; then per
  ASID, in ASID order: ``u32 asid, u8 default (0 empty, 1 identity), u8 flags
  (bit 0 passthrough), u16 0, u64 entries``, then each entry, sorted by IOVA:
  ``u64 iova, u64 size, u64 target, u8 kind, u8 perm, 6 zero bytes``. The only
  target kind is 1, a guest physical address: a front-end user address means
  nothing to another front-end process.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import PyVhostUserError
from ..memory.iotlb import DefaultMapping, IotlbEntry
from ..memory.iotlb_state import AddressSpacesState, IotlbState, IotlbStateError

MAGIC: Final = b"PVUDEVST"
VERSION: Final = 1
HEADER: Final = struct.Struct("<8sHHIII")
SECTION: Final = struct.Struct("<HHI")
SECTION_OPTIONAL: Final = 0x1
SPACES_HEAD: Final = struct.Struct("<II")
ASID_RECORD: Final = struct.Struct("<IBBHQ")
ENTRY: Final = struct.Struct("<QQQBB6x")
TARGET_GPA: Final = 1
ASID_PASSTHROUGH: Final = 0x1
# A million IOTLB entries take 32 MiB; past this a stream is refused unread, so a
# front-end cannot make the back-end buffer without bound.
MAX_STATE_BYTES: Final = 128 << 20

_DEFAULT_CODES: Final = {DefaultMapping.EMPTY: 0, DefaultMapping.IDENTITY: 1}
_DEFAULTS: Final = {code: default for default, code in _DEFAULT_CODES.items()}


class SectionType(enum.IntEnum):
    DEVICE = 1
    ADDRESS_SPACES = 2


class DeviceStateError(PyVhostUserError):
    """A device state stream that cannot be read, or a state that cannot be written."""


@dataclass(frozen=True)
class DeviceState:
    """What a back-end migrates: its device's state and, maybe, its address spaces."""

    device: dict[str, Any] = field(default_factory=dict)
    address_spaces: AddressSpacesState | None = None


# -- writing ---------------------------------------------------------------------------


def encode(state: DeviceState) -> bytes:
    sections = [_section(SectionType.DEVICE, _encode_device(state.device))]
    if state.address_spaces is not None:
        sections.append(
            _section(SectionType.ADDRESS_SPACES, _encode_address_spaces(state.address_spaces))
        )
    body = b"".join(sections)
    if HEADER.size + len(body) > MAX_STATE_BYTES:
        raise DeviceStateError(f"the state takes {len(body)} bytes, more than a reader takes")
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, len(body), zlib.crc32(body), len(sections))
    return header + body


def _section(kind: SectionType, payload: bytes, flags: int = 0) -> bytes:
    return SECTION.pack(kind, flags, len(payload)) + payload


def _encode_device(device: dict[str, Any]) -> bytes:
    try:
        return json.dumps(device, sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise DeviceStateError(f"the device state is not JSON: {exc}") from None


def _encode_address_spaces(state: AddressSpacesState) -> bytes:
    out = bytearray(SPACES_HEAD.pack(len(state.iotlbs), len(state.group_asid)))
    out += struct.pack(f"<{len(state.group_asid)}I", *state.group_asid)
    for iotlb in state.iotlbs:
        flags = ASID_PASSTHROUGH if iotlb.passthrough else 0
        out += ASID_RECORD.pack(iotlb.asid, _DEFAULT_CODES[iotlb.default], flags, 0,
                                len(iotlb.entries))
        start = len(out)
        out += bytes(ENTRY.size * len(iotlb.entries))
        for i, entry in enumerate(iotlb.entries):
            # iotlb_state made every target a gpa; that is all a stream can carry.
            ENTRY.pack_into(out, start + i * ENTRY.size, entry.iova, entry.size, entry.target,
                            TARGET_GPA, entry.perm)
    return bytes(out)


# -- reading ---------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview) -> DeviceState:
    """Check everything and return the state; ``DeviceStateError`` names the first fault."""
    view = memoryview(data).cast("B")
    body = _checked_body(view)
    device: dict[str, Any] | None = None
    address_spaces: AddressSpacesState | None = None
    seen: set[int] = set()
    for kind, flags, payload in _sections(body, HEADER.unpack_from(view)[5]):
        if kind in seen:
            raise DeviceStateError(f"section {_section_name(kind)} appears twice")
        seen.add(kind)
        if kind == SectionType.DEVICE:
            device = _decode_device(payload)
        elif kind == SectionType.ADDRESS_SPACES:
            address_spaces = _decode_address_spaces(payload)
        elif not flags & SECTION_OPTIONAL:
            raise DeviceStateError(f"section type {kind} is unknown to this back-end and not "
                                   "optional")
    if device is None:
        raise DeviceStateError("no DEVICE section")
    return DeviceState(device, address_spaces)


def _checked_body(view: memoryview) -> memoryview:
    if len(view) < HEADER.size:
        raise DeviceStateError(f"truncated: {len(view)} bytes, the header alone takes "
                               f"{HEADER.size}")
    magic, version, header_size, body_size, crc, _sections = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise DeviceStateError(f"bad magic {bytes(magic)!r}: not a pyvhost-user device state")
    if version != VERSION:
        newer = "newer than" if version > VERSION else "unknown to"
        raise DeviceStateError(f"version {version} is {newer} this back-end (it reads "
                               f"version {VERSION})")
    if header_size != HEADER.size:
        raise DeviceStateError(f"header size {header_size}, version {VERSION} has "
                               f"{HEADER.size}")
    if len(view) < HEADER.size + body_size:
        raise DeviceStateError(f"truncated: {len(view)} bytes of the {HEADER.size + body_size} "
                               "the header announces")
    if len(view) > HEADER.size + body_size:
        raise DeviceStateError(f"{len(view) - HEADER.size - body_size} bytes after the end "
                               "the header announces")
    body = view[HEADER.size :]
    if zlib.crc32(body) != crc:
        raise DeviceStateError(f"checksum mismatch: crc32 {zlib.crc32(body):#010x}, the header "
                               f"says {crc:#010x} (corrupted in transit)")
    return body


def _sections(body: memoryview, count: int) -> Iterator[tuple[int, int, memoryview]]:
    offset = 0
    for index in range(count):
        if offset + SECTION.size > len(body):
            raise DeviceStateError(f"section {index} of {count} starts past the body's end")
        kind, flags, size = SECTION.unpack_from(body, offset)
        offset += SECTION.size
        if flags & ~SECTION_OPTIONAL:
            raise DeviceStateError(f"section {_section_name(kind)}: unknown flags {flags:#x}")
        if offset + size > len(body):
            raise DeviceStateError(f"section {_section_name(kind)} of {size} bytes runs past "
                                   "the body's end")
        yield kind, flags, body[offset : offset + size]
        offset += size
    if offset != len(body):
        raise DeviceStateError(f"{len(body) - offset} bytes after the last of {count} sections")


def _section_name(kind: int) -> str:
    try:
        return SectionType(kind).name
    except ValueError:
        return f"type {kind}"


def _decode_device(payload: memoryview) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise DeviceStateError("DEVICE section: a JSON key appears twice")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise DeviceStateError(f"DEVICE section: {name} is not a JSON value")

    try:
        value = json.loads(bytes(payload).decode(), object_pairs_hook=no_duplicates,
                           parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeviceStateError(f"DEVICE section is not JSON: {exc}") from None
    except RecursionError:
        raise DeviceStateError("DEVICE section nests too deep") from None
    if not isinstance(value, dict):
        raise DeviceStateError(f"DEVICE section is a JSON {type(value).__name__}, not an object")
    return value


def _decode_address_spaces(payload: memoryview) -> AddressSpacesState:
    reader = _Reader(payload, "ADDRESS_SPACES")
    num_asids, num_groups = reader.take(SPACES_HEAD)
    # Each count is bounded by the bytes that must follow it, before anything is built.
    reader.need(4 * num_groups + ASID_RECORD.size * num_asids, f"{num_asids} ASIDs")
    group_asid = struct.unpack_from(f"<{num_groups}I", reader.bytes(4 * num_groups))
    iotlbs = []
    for _ in range(num_asids):
        asid, default_code, flags, reserved, count = reader.take(ASID_RECORD)
        where = f"ADDRESS_SPACES asid {asid}"
        if default_code not in _DEFAULTS:
            raise DeviceStateError(f"{where}: default {default_code} is neither empty (0) nor "
                                   "identity (1)")
        if flags & ~ASID_PASSTHROUGH or reserved:
            raise DeviceStateError(f"{where}: unknown flags {flags:#x} or reserved {reserved}")
        raw = reader.bytes(ENTRY.size * count, f"{count} entries")
        entries = []
        for iova, size, target, kind, perm in ENTRY.iter_unpack(raw):
            if kind != TARGET_GPA:
                raise DeviceStateError(f"{where} entry iova {iova:#x}: target kind {kind} is "
                                       "unknown (1, a guest physical address, is the only one)")
            entries.append(IotlbEntry(iova, size, target, perm, "gpa"))
        # ENTRY's 6 pad bytes are not unpacked: they must be zero all the same.
        if any(raw[i + 26 : i + 32] != bytes(6) for i in range(0, len(raw), ENTRY.size)):
            raise DeviceStateError(f"{where}: an entry's reserved bytes are not zero")
        try:
            iotlbs.append(IotlbState(asid, _DEFAULTS[default_code],
                                     bool(flags & ASID_PASSTHROUGH), tuple(entries)))
        except IotlbStateError as exc:
            raise DeviceStateError(f"ADDRESS_SPACES: {exc}") from None
    reader.done()
    try:
        return AddressSpacesState(tuple(group_asid), tuple(iotlbs))
    except IotlbStateError as exc:
        raise DeviceStateError(f"ADDRESS_SPACES: {exc}") from None


class _Reader:
    """Reads fixed layouts off a section, refusing to run past its end."""

    def __init__(self, data: memoryview, name: str) -> None:
        self.data = data
        self.name = name
        self.offset = 0

    def need(self, size: int, what: str) -> None:
        if self.offset + size > len(self.data):
            raise DeviceStateError(f"{self.name}: {what} need {size} bytes, "
                                   f"{len(self.data) - self.offset} are left")

    def bytes(self, size: int, what: str = "the group bindings") -> memoryview:
        self.need(size, what)
        piece = self.data[self.offset : self.offset + size]
        self.offset += size
        return piece

    def take(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.bytes(layout.size, "a record"))

    def done(self) -> None:
        if self.offset != len(self.data):
            raise DeviceStateError(f"{self.name}: {len(self.data) - self.offset} bytes after "
                                   "its last record")
