"""The flight recorder on a real QEMU run: a guest that boots twice on our back-end.

What the trace must show, on QEMU 7.2 and 10.0: the memory table arriving once,
the rings started by the firmware and by the kernel on every boot, the first
I/O after each start, the device reset at each reboot (7.2 resets with
SET_STATUS 0, 10.0 with RESET_DEVICE), in that order; and the files written at
exit are a valid Chrome trace and a Mermaid diagram.
"""

from __future__ import annotations

import json

import pytest
from chrome_trace_format import chrome_trace_problems
from pyvhost_user.control.client import ControlClient
from pyvhost_user.launch import SUPPORTED_VERSIONS as QEMU_VERSIONS

pytestmark = [pytest.mark.vm, pytest.mark.timeout(150)]


def steps(trace: dict) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e["ph"] != "M"), key=lambda e: e["ts"])


@pytest.mark.parametrize("qemu_version", QEMU_VERSIONS)
def test_a_rebooting_guest_leaves_a_readable_trace(
        qemu_version, disk_image, backend_factory, machine_factory, sock_dir, tmp_path):
    image = disk_image(16)
    control = sock_dir / "ctl.sock"
    chrome_out, mermaid_out = tmp_path / "trace.json", tmp_path / "sequence.mmd"
    backend = backend_factory("pyvhost", image, extra_args=(
        "--control-socket", str(control), "--trace-out", str(chrome_out),
        "--sequence-out", str(mermaid_out)))
    m = machine_factory(qemu_version, [backend.device()], steps=["md5"], reboot=True)
    boots = m.wait_for_done(timeout=110, boots=2)
    assert boots[0]["md5"] == image.md5() == boots[1]["md5"]
    with ControlClient(control) as client:
        trace = client.execute("query-flight-recorder", {"format": "chrome"})
    m.shutdown()
    assert chrome_trace_problems(trace) == []
    events = steps(trace)
    names = [e["name"] for e in events]
    memory = [n for n in names if n in ("ADD_MEM_REG", "SET_MEM_TABLE")]
    assert memory, "no memory table in the trace"
    first_stop = names.index("RING_STOPPED")
    assert not {"ADD_MEM_REG", "SET_MEM_TABLE"} & set(names[first_stop:])
    resets = [e for e in events if e["name"] == "DEVICE_RESET"]
    causes = {e["args"]["cause"] for e in resets}
    assert ("RESET_DEVICE" if qemu_version == "10.0" else "SET_STATUS 0") in causes, causes
    starts = [i for i, n in enumerate(names) if n == "RING_STARTED"]
    assert len(starts) >= 4, "firmware and kernel start the ring on each boot"
    first_io = [i for i, n in enumerate(names) if n == "FIRST_IO"]
    # The kernel's start on each boot is followed by its first I/O before the next stop.
    assert sum(any(s < f for f in first_io) for s in starts) >= 3
    last_boot_start = starts[-1]
    assert any(e["name"] == "DEVICE_RESET" for e in events[:last_boot_start])
    spans = [e for e in events if e["cat"] == "vhost-user"]
    assert all(e["ph"] == "X" and "request" in e["args"] for e in spans)
    print(f"QEMU {qemu_version}: {len(events)} events, {len(spans)} requests, "
          f"{len(resets)} device resets ({sorted(causes)}), {len(starts)} ring starts")
    assert backend.stop() == 0
    written = json.loads(chrome_out.read_text())
    assert chrome_trace_problems(written) == []
    assert [e["name"] for e in steps(written)][-1] == "FRONT_END_DISCONNECTED"
    text = mermaid_out.read_text()
    assert text.startswith("sequenceDiagram") and "RING_STARTED" in text
