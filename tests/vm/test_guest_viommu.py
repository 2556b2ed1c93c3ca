"""Real guests behind a vIOMMU: the back-end's device IOTLB on QEMU 7.2 and 10.0 (TCG).

``Machine(viommu=True)`` gives the guest QEMU's Intel IOMMU (intremap=on,
device-iotlb=on), puts the disk behind it (iommu_platform=on, ats=on,
disable-legacy=on, behind a pcie-root-port) and boots the kernel with
``intel_iommu=on``. The device then negotiates VIRTIO_F_ACCESS_PLATFORM: ring
and buffer addresses are IOVAs, which the back-end translates with the
IOTLB_MSG updates QEMU sends (unasked for the used ring at each start, else in
answer to the misses the back-end sends on the back-end channel).

Only our back-end runs here: qemu-storage-daemon offers no ACCESS_PLATFORM and
QEMU refuses to start with it (test_qsd_is_refused_behind_a_viommu documents
the contrast).

What "no stale translation" means, and why these tests can see one: a guest
reset (reboot, or the driver unbound and bound again) tears down the guest's
DMA mappings; the next boot or probe maps its new rings and buffers, often at
the same IOVAs (Linux allocates IOVAs top-down from 4 GiB, so a fresh domain
hands out the same addresses again) but over other guest pages. QEMU sends no
invalidation for a reboot. A back-end that kept an IOVA -> address entry
across the reset would then read descriptors or data from, and write data to,
the old pages: the guest reads wrong data (md5 mismatch), the host image gets
wrong data (write checks), or the ring is garbage (errors, timeouts). To make
"same IOVA, other page" likely on every reset, the guest holds a random
amount of RAM before the drivers load and at every rebind (``pvu_hog_kib``),
and freed pages are zeroed (``init_on_free=1``); the protocol trace then shows
on the host whether some IOVA really was remapped to another address after a
reset (``StaleCandidates``), so a pass is known to have tested something.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import pytest
from pyvhost_user.launch import SUPPORTED_VERSIONS as QEMU_VERSIONS
from pyvhost_user.launch import MachineError

MiB = 1 << 20
PAGE = 4096
KIND = "pyvhost"

pytestmark = [pytest.mark.vm]

REFUSED = "iommu_platform=true is not supported by the device"


# ---- helpers ------------------------------------------------------------------

def start_viommu_machine(machine_factory, qemu_version, backend, **kwargs):
    """A started Machine with a vIOMMU; a clear failure when QEMU refuses the device."""
    try:
        return machine_factory(qemu_version, [backend.device()], viommu=True, **kwargs)
    except MachineError as e:
        if REFUSED in str(e):
            pytest.fail(
                f"QEMU {qemu_version} refused the device behind the vIOMMU: the back-end "
                f"does not offer VIRTIO_F_ACCESS_PLATFORM (bit 33) yet ({REFUSED!r})",
                pytrace=False)
        raise


def check_boot(boot, machine):
    assert boot.done, machine.describe("guest did not finish its steps")
    assert not boot.errors, machine.describe(f"guest errors: {boot.errors}; dmesg: {boot.dmesg}")


def dmar_faults(machine) -> list[str]:
    """Guest kernel lines reporting a DMA remapping fault (console, before dmesg -n 1)."""
    return [line for line in machine.serial_text().splitlines() if "DMAR: [DMA" in line]


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def expected_parts(original: bytes, write_mib: int, range_md5: str | None) -> dict[str, str]:
    """md5parts of a disk that is ``original`` except, maybe, its write range."""
    w = write_mib * MiB
    return {
        "md5_head": md5_of(original[:w]),
        "md5_range": range_md5 or md5_of(original[w:w + 4 * MiB]),
        "md5_tail": md5_of(original[w + 4 * MiB:]),
    }


# ---- the protocol trace ---------------------------------------------------------

_TRACE = re.compile(r"(<-|->) ([A-Z_]+)\b(.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


def _int(v: str) -> int:
    return int(v, 0)


@dataclass
class TraceEvent:
    direction: str              # "<-" from QEMU, "->" to QEMU
    name: str
    fields: dict[str, str]
    line: int

    @property
    def is_reset(self) -> bool:
        return self.direction == "<-" and (
            self.name == "RESET_DEVICE"
            or (self.name == "SET_STATUS" and self.fields.get("value") == "0"))


@dataclass
class StaleCandidates:
    """IOVA pages live in the back-end's IOTLB (updated, not invalidated) at a
    device reset and mapped to another address afterwards: a back-end that kept
    its IOTLB across that reset would have used the old address for them."""

    pages: dict[int, tuple[int, int]] = field(default_factory=dict)  # iova -> (old, new)

    def __bool__(self) -> bool:
        return bool(self.pages)

    def __str__(self) -> str:
        shown = ", ".join(f"{i:#x}: {o:#x} -> {n:#x}" for i, (o, n) in list(self.pages.items())[:8])
        return f"{len(self.pages)} IOVA page(s) remapped after a reset ({shown})"


class Trace:
    """The back-end's protocol trace (debug log lines ``<- NAME ...`` / ``-> NAME ...``)."""

    def __init__(self, log: str) -> None:
        self.events: list[TraceEvent] = []
        for n, raw in enumerate(log.splitlines()):
            m = _TRACE.search(raw)
            if m and "trace" in raw[:m.start()]:
                self.events.append(TraceEvent(m.group(1), m.group(2),
                                              dict(_FIELD.findall(m.group(3))), n))

    def received(self, name: str, **fields: str) -> list[TraceEvent]:
        return [e for e in self.events if e.direction == "<-" and e.name == name
                and all(e.fields.get(k) == v for k, v in fields.items())]

    def iotlb(self, kind: str) -> list[TraceEvent]:
        return self.received("IOTLB_MSG", type=kind)

    def epochs(self) -> list[list[TraceEvent]]:
        """The trace split at device resets (SET_STATUS 0, RESET_DEVICE)."""
        out: list[list[TraceEvent]] = [[]]
        for e in self.events:
            if e.is_reset:
                out.append([])
            out[-1].append(e)
        return out

    def stale_candidates(self) -> StaleCandidates:
        live: dict[int, int] = {}      # IOVA page -> address, since the last reset
        before: dict[int, int] = {}    # live at some reset, not invalidated since
        found = StaleCandidates()
        for e in self.events:
            if e.is_reset:
                before.update(live)
                live.clear()
                continue
            if e.direction != "<-" or e.name != "IOTLB_MSG":
                continue
            iova, size = _int(e.fields["iova"]), _int(e.fields["size"])
            kind = e.fields.get("type")
            if kind == "UPDATE":
                uaddr = _int(e.fields["uaddr"])
                for off in range(0, size, PAGE):
                    page, addr = iova + off, uaddr + off
                    live[page] = addr
                    if page in before and before[page] != addr:
                        found.pages.setdefault(page, (before[page], addr))
            elif kind == "INVALIDATE":
                end = iova + size
                for table in (live, before):
                    for page in [p for p in table if iova <= p < end]:
                        del table[page]
        return found

    def summary(self) -> str:
        """One line per epoch: the requests received, IOTLB runs collapsed."""
        lines = []
        for i, epoch in enumerate(self.epochs()):
            parts: list[str] = []
            run_kind, run_n = None, 0
            for e in epoch:
                if e.direction != "<-":
                    continue
                if e.name == "IOTLB_MSG":
                    kind = e.fields.get("type")
                    if kind == run_kind:
                        run_n += 1
                        continue
                    if run_kind:
                        parts.append(f"IOTLB {run_kind} x{run_n}")
                    run_kind, run_n = kind, 1
                    continue
                if run_kind:
                    parts.append(f"IOTLB {run_kind} x{run_n}")
                    run_kind, run_n = None, 0
                extra = ""
                if e.name in ("SET_STATUS", "SET_VRING_ENABLE"):
                    extra = " " + e.fields.get("value", e.fields.get("num", ""))
                elif e.name == "SET_VRING_ADDR":
                    extra = f" used={e.fields.get('used_user_addr')}"
                parts.append(e.name + extra)
            if run_kind:
                parts.append(f"IOTLB {run_kind} x{run_n}")
            lines.append(f"[{i}] " + ", ".join(parts))
        return "\n".join(lines)

    def used_ring_updates_unasked(self) -> list[bool]:
        """For each SET_VRING_ADDR: did QEMU send an UPDATE covering the used ring
        before the back-end's first miss after it (the miss is logged as
        ``IOTLB miss``)? Misses are not trace lines: this looks at the debug log
        order of UPDATE lines only, so it answers 'is the used ring's page the
        first one QEMU maps after the ring address'."""
        out = []
        for i, e in enumerate(self.events):
            if not (e.direction == "<-" and e.name == "SET_VRING_ADDR"):
                continue
            used = _int(e.fields["used_user_addr"])
            first = next((u for u in self.events[i + 1:]
                          if u.name == "IOTLB_MSG" and u.direction == "<-"
                          and u.fields.get("type") == "UPDATE"), None)
            out.append(first is not None and _int(first.fields["iova"]) <= used
                       < _int(first.fields["iova"]) + _int(first.fields["size"]))
        return out


def check_updates_arrive(backend, qemu_version) -> Trace:
    trace = Trace(backend.log())
    assert trace.received("IOTLB_MSG", type="UPDATE"), (
        f"QEMU {qemu_version}: no IOTLB_MSG UPDATE in the back-end's trace "
        "(was ACCESS_PLATFORM negotiated? is the trace at debug level?)")
    return trace


# ---- tests --------------------------------------------------------------------------

@pytest.mark.timeout(150)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_viommu_reads_whole_disk_and_writes_at_offset(
        qemu_version, disk_image, backend_factory, machine_factory):
    image = disk_image(64)
    host_md5 = image.md5()
    write_mib = 8
    before_outside = (image.md5(0, write_mib * MiB), image.md5((write_mib + 4) * MiB))
    backend = backend_factory(KIND, image)

    m = start_viommu_machine(machine_factory, qemu_version, backend,
                             steps=["md5", "write"], write_mib=write_mib)
    [boot] = m.wait_for_done(timeout=120)
    check_boot(boot, m)
    assert m.wait_exit(30) == 0

    assert boot["md5"] == host_md5, "whole-disk read through the vIOMMU differs from the host"
    assert boot["write"] == "ok"
    assert boot["readback_md5"] == boot["write_md5"]
    assert image.md5(write_mib * MiB, 4 * MiB) == boot["write_md5"], \
        "the guest's write is not at its offset on the host image"
    assert (image.md5(0, write_mib * MiB), image.md5((write_mib + 4) * MiB)) == before_outside, \
        "the guest's write changed the host image outside its range"
    trace = check_updates_arrive(backend, qemu_version)
    print(f"QEMU {qemu_version}: {len(trace.iotlb('UPDATE'))} UPDATE, "
          f"{len(trace.iotlb('INVALIDATE'))} INVALIDATE; DMAR faults: {dmar_faults(m)}")


@pytest.mark.timeout(320)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_viommu_guest_reboots(qemu_version, disk_image, backend_factory, machine_factory):
    """Three boots (without -no-reboot): every read and write right on every boot.

    Each boot reads the disk in three parts around the write range: the head
    and tail must be the original, the range what the previous boot wrote.
    """
    image = disk_image(16)
    original = image.read()
    write_mib = 4
    backend = backend_factory(KIND, image)

    m = start_viommu_machine(machine_factory, qemu_version, backend,
                             steps=["md5", "md5parts", "write"], write_mib=write_mib,
                             reboot=True)
    boots = m.wait_for_done(timeout=290, boots=3)   # 50 s alone; slower on a busy host
    m.shutdown()
    assert len(boots) >= 3
    previous_write = None
    for n, boot in enumerate(boots[:3]):
        check_boot(boot, m)
        if n == 0:
            assert boot["md5"] == md5_of(original), "boot 0: whole-disk read differs"
        got = {k: boot[k] for k in ("md5_head", "md5_range", "md5_tail")}
        assert got == expected_parts(original, write_mib, previous_write), \
            f"boot {n}: the disk read back differs from the host's (parts {got})"
        assert boot["write"] == "ok" and boot["readback_md5"] == boot["write_md5"], \
            f"boot {n}: write or its read-back failed"
        previous_write = boot["write_md5"]
    # The host image has the last write (a 4th boot, if any, has not written yet).
    last = boots[3]["write_md5"] if len(boots) > 3 and "write" in boots[3] else previous_write
    assert image.md5(write_mib * MiB, 4 * MiB) == last
    assert backend.alive()

    trace = check_updates_arrive(backend, qemu_version)
    resets = [e for e in trace.events if e.is_reset]
    assert len(resets) >= 3, "expected at least a device reset per boot"
    print(f"QEMU {qemu_version} trace by epoch (split at device resets):\n{trace.summary()}")
    print(f"used ring mapped first after each SET_VRING_ADDR: {trace.used_ring_updates_unasked()}")
    print(f"DMAR faults: {dmar_faults(m)}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_viommu_driver_rebind(qemu_version, disk_image, backend_factory, machine_factory):
    """virtio_blk unbound and bound again twice in one boot (a device reset each,
    new rings): reads and the write stay right."""
    image = disk_image(16)
    original_md5 = image.md5()
    write_mib = 4
    backend = backend_factory(KIND, image)

    m = start_viommu_machine(machine_factory, qemu_version, backend,
                             steps=["md5", "rebind", "md5", "write", "rebind", "md5"],
                             write_mib=write_mib, append=["init_on_free=1"],
                             guest_args={"pvu_hog_kib": 8192})
    [boot] = m.wait_for_done(timeout=150)
    check_boot(boot, m)
    assert m.wait_exit(30) == 0

    assert boot.all["rebind"] == ["ok", "ok"]
    md5s = boot.all["md5"]
    assert len(md5s) == 3
    assert md5s[0] == original_md5, "read before the rebind differs from the host"
    assert md5s[1] == original_md5, "read after the first rebind differs from the host"
    assert boot["write"] == "ok" and boot["readback_md5"] == boot["write_md5"]
    assert image.md5(write_mib * MiB, 4 * MiB) == boot["write_md5"]
    assert md5s[2] == image.md5(), "read after the second rebind differs from the host"

    trace = check_updates_arrive(backend, qemu_version)
    print(f"QEMU {qemu_version}: hog {boot.all.get('hog_kib')} KiB; "
          f"{len(trace.iotlb('UPDATE'))} UPDATE, {len(trace.iotlb('INVALIDATE'))} INVALIDATE; "
          f"{trace.stale_candidates()}\n{trace.summary()}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_qsd_is_refused_behind_a_viommu(qemu_version, disk_image, backend_factory,
                                        machine_factory):
    """qemu-storage-daemon (libvhost-user) offers no ACCESS_PLATFORM: QEMU 7.2 and
    10.0 refuse the device at start-up instead of running it untranslated."""
    image = disk_image(4)
    backend = backend_factory("qsd", image)
    with pytest.raises(MachineError) as err:
        machine_factory(qemu_version, [backend.device()], viommu=True)
    assert REFUSED in str(err.value), str(err.value)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_no_stale_translation_after_resets(
        qemu_version, disk_image, backend_factory, machine_factory):
    """No stale IOVA translation is served after a device reset.

    Three boots, each: read the disk in parts, rebind the driver, read again,
    write. Every reset is followed by new rings and buffers at IOVAs that Linux
    hands out again (top-down from 4 GiB in a fresh domain), over other pages:
    the guest holds a random 0-16 MiB before loading the drivers and at the
    rebind, and freed pages are zeroed (init_on_free=1), so an old translation
    points at zeros or at someone else's data. A back-end serving one makes a
    read differ, a write land elsewhere, or the ring break.

    The guest runs with iommu.strict=1. In Linux's default lazy mode the
    guest's flush queue ends in a domain-wide invalidation, which QEMU passes
    on as INVALIDATE of everything but the MSI window (two messages): at a
    reboot nothing is left live in the device IOTLB, so even a back-end that
    kept it would have nothing stale (the trace shows it). In strict mode each
    unmap is invalidated page by page and the rings, mapped once at probe, stay
    live until the reset: a reboot (no invalidation from QEMU) then leaves
    their IOVAs mapped in a back-end that keeps its IOTLB, and the next boot
    maps the same IOVAs over other pages. The trace must show at least one
    IOVA page remapped to another address after a reset: proof that this run
    exercised a case where a stale entry would have been wrong.
    """
    image = disk_image(16)
    original = image.read()
    write_mib = 4
    backend = backend_factory(KIND, image)

    m = start_viommu_machine(machine_factory, qemu_version, backend,
                             steps=["md5parts", "rebind", "md5parts", "write"],
                             write_mib=write_mib, reboot=True,
                             append=["init_on_free=1", "iommu.strict=1"],
                             guest_args={"pvu_hog_kib": 16384})
    boots = m.wait_for_done(timeout=370, boots=3)
    m.shutdown()
    previous_write = None
    for n, boot in enumerate(boots[:3]):
        check_boot(boot, m)
        assert boot["rebind"] == "ok"
        want = expected_parts(original, write_mib, previous_write)
        for k, v in want.items():
            assert boot.all[k] == [v, v], \
                f"boot {n}: {k} before/after the rebind {boot.all[k]}, host says {v}"
        assert boot["write"] == "ok" and boot["readback_md5"] == boot["write_md5"]
        previous_write = boot["write_md5"]

    trace = check_updates_arrive(backend, qemu_version)
    stale = trace.stale_candidates()
    print(f"QEMU {qemu_version}: hogs {[b.all.get('hog_kib') for b in boots[:3]]} KiB; {stale}")
    assert stale, (
        "no IOVA was remapped to another address after a reset in this run: the "
        "check did not exercise a stale translation (see the trace summary)\n" + trace.summary())


@pytest.mark.timeout(200)
def test_stale_translation_catcher_catches_a_backend_that_keeps_its_iotlb(
        disk_image, backend_factory, machine_factory):
    """Negative control for the test above: the same guest, but the back-end keeps its
    IOTLB across device resets although stock QEMU never invalidates at a reset
    (``--iotlb-persist always``, which the back-end warns about). The catcher must
    see it: a read that differs from the host, a failed rebind, guest errors, or a
    guest that never finishes. QEMU 10.0 only (the faster boot)."""
    image = disk_image(16)
    original = image.read()
    write_mib = 4
    backend = backend_factory(KIND, image, extra_args=("--iotlb-persist", "always"))
    m = start_viommu_machine(machine_factory, "10.0", backend,
                             steps=["md5parts", "rebind", "md5parts", "write"],
                             write_mib=write_mib, reboot=True,
                             append=["init_on_free=1", "iommu.strict=1"],
                             guest_args={"pvu_hog_kib": 16384})
    caught = []
    try:
        boots = m.wait_for_done(timeout=150, boots=2)
    except MachineError as exc:
        caught.append(f"guest did not finish: {str(exc).splitlines()[0]}")
    else:
        previous_write = None
        for n, boot in enumerate(boots[:2]):
            if boot.errors or boot.get("rebind") != "ok":
                caught.append(f"boot {n}: guest errors {boot.errors} rebind={boot.get('rebind')}")
            for k, v in expected_parts(original, write_mib, previous_write).items():
                if boot.all.get(k) != [v, v]:
                    caught.append(f"boot {n}: {k} read {boot.all.get(k)}, host has {v}")
            previous_write = boot.get("write_md5")
    m.kill()
    assert "stale translations possible" in backend.log()
    assert caught, "a back-end serving stale translations went unnoticed"
    print(f"caught: {caught}")
