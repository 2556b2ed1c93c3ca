"""The flight recorder and the map-cost model of the real back-end process.

A VMM with our address-space extension and IOTLB persistence maps its RAM,
reboots the guest (device reset: mappings kept), asks for RESET_MAP; the
trace fetched over the control socket and the one written at exit must be
valid Chrome trace event JSON, hold each step in order, and the Mermaid
diagram must tell the same story. The map cost is paid in the request that
maps: simulated (the back-end's own account shows the rate), or real (the
guest's pages are populated: the memfd's blocks grow by what was mapped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chrome_trace_format import chrome_trace_problems
from pyvhost_user.control.client import ControlClient
from pyvhost_user.frontend import BlkDriver, GuestRam, LinearIommu

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20


def step_names(trace: dict) -> list[str]:
    return [e["name"] for e in sorted((e for e in trace["traceEvents"] if e["ph"] != "M"),
                                      key=lambda e: e["ts"])]


def test_trace_of_a_persistent_reset_and_a_reset_map(backend_factory, image, sock_dir, tmp_path):
    control = sock_dir / "ctl.sock"
    chrome_out, mermaid_out = tmp_path / "trace.json", tmp_path / "sequence.mmd"
    backend = backend_factory("pyvhost", image, extra_args=(
        "--control-socket", str(control), "--trace-out", str(chrome_out),
        "--sequence-out", str(mermaid_out)))
    with BlkDriver.connect(backend.socket_path, iommu="offset", premap=True, extension=True,
                           persist=True) as driver:
        assert driver.read(0, 4096) == image.read_bytes()[:4096]
        driver.reboot()
        assert driver.read(8, 4096) == image.read_bytes()[4096:8192]
        driver.frontend.reset_map(0)
        with ControlClient(control) as client:
            trace = client.execute("query-flight-recorder", {"format": "chrome"})
            summary = client.execute("query-flight-recorder", {"format": "summary"})
            text = client.execute("query-flight-recorder", {"format": "mermaid", "last": 50})
    assert chrome_trace_problems(trace) == []
    assert summary["dropped"] == 0 and summary["kept"] == summary["recorded"] > 50
    names = step_names(trace)
    order = ["FRONT_END_CONNECTED", "IOTLB_BATCH_END", "RING_STARTED", "FIRST_IO",
             "RING_STOPPED", "DEVICE_RESET", "RING_STARTED", "FIRST_IO", "RESET_MAP"]
    at = 0
    for name in order:  # each step, in this order (other events between)
        assert name in names[at:], f"{name} missing after step {at}: {names}"
        at = names.index(name, at) + 1
    reset = next(e for e in trace["traceEvents"] if e["name"] == "DEVICE_RESET")
    assert reset["args"]["iotlb"] == "kept" and reset["cat"] == "life-cycle"
    maps = [e for e in trace["traceEvents"] if e["name"] == "MAP"]
    assert maps and all(e["cat"] == "mapping" for e in maps)
    assert len(maps) == driver.frontend.iotlb_counters["update"]  # kept: mapped once
    request = next(e for e in trace["traceEvents"] if e["name"] == "GET_VRING_BASE")
    assert request["ph"] == "X" and "GET_VRING_BASE reply" in request["args"]["answer"]
    assert text.startswith("sequenceDiagram") and "RESET_MAP" in text
    backend.stop()
    written = json.loads(chrome_out.read_text())
    assert chrome_trace_problems(written) == []
    assert step_names(written)[-1] == "FRONT_END_DISCONNECTED"
    sequence = mermaid_out.read_text()
    assert sequence.startswith("sequenceDiagram") and "DEVICE_RESET" in sequence


def test_vhost_user_ctl_writes_the_trace_to_a_file(backend_factory, image, sock_dir, tmp_path):
    control = sock_dir / "ctl.sock"
    backend = backend_factory("pyvhost", image, extra_args=("--control-socket", str(control)))
    with BlkDriver.connect(backend.socket_path) as driver:
        driver.read(0, 4096)
    out = tmp_path / "t.json"
    done = subprocess.run(
        [sys.executable, "-m", "pyvhost_user.cli.ctl", "--socket", str(control),
         "query-flight-recorder", "--format", "chrome", "-o", str(out)],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert chrome_trace_problems(json.loads(out.read_text())) == []
    done = subprocess.run(
        [sys.executable, "-m", "pyvhost_user.cli.ctl", "--socket", str(control),
         "query-flight-recorder", "--format", "nonsense"], capture_output=True, text=True,
        timeout=30)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_simulated_map_cost_is_paid_in_the_update_at_the_given_rate(backend_factory, image,
                                                                     sock_dir):
    control = sock_dir / "ctl.sock"
    rate = 2.0  # s/GiB: 64 MiB cost at least 0.125 s
    backend = backend_factory("pyvhost", image, extra_args=(
        "--control-socket", str(control), "--map-cost", "simulated",
        "--map-cost-rate", str(rate), "--asid-default", "empty"))
    ram = GuestRam([(0, 64 * MiB)])
    try:
        with BlkDriver.connect(backend.socket_path, ram=ram, iommu=LinearIommu(ram, chunk=16 * MiB),
                               premap=True, extension=True, persist=True) as driver:
            assert driver.read(0, 4096) == image.read_bytes()[:4096]
            with ControlClient(control) as client:
                stats = client.execute("query-stats")
                spaces = client.execute("query-address-spaces")
        assert stats["map_cost"] == "simulated" and stats["map_cost_seconds_per_gib"] == rate
        assert stats["map_cost_maps"] == 4 and stats["map_cost_bytes"] == 64 * MiB
        assert stats["map_cost_seconds"] >= 64 * MiB / (1 << 30) * rate
        assert spaces[0]["entries"] == 4 and spaces[0]["mapped_bytes"] == 64 * MiB
    finally:
        ram.close()


def test_real_map_cost_populates_the_mapped_pages(backend_factory, image, sock_dir):
    control = sock_dir / "ctl.sock"
    backend = backend_factory("pyvhost", image, extra_args=(
        "--control-socket", str(control), "--map-cost", "real", "--asid-default", "empty"))
    ram = GuestRam([(0, 64 * MiB)])
    try:
        fd = ram.regions[0].fd
        before = os.fstat(fd).st_blocks * 512
        assert before < 8 * MiB  # sparse: only what the front-end touched
        with BlkDriver.connect(backend.socket_path, ram=ram, iommu=LinearIommu(ram, chunk=16 * MiB),
                               premap=True, extension=True, persist=True) as driver:
            assert driver.read(0, 4096) == image.read_bytes()[:4096]
            allocated = os.fstat(fd).st_blocks * 512
            with ControlClient(control) as client:
                stats = client.execute("query-stats")
        assert allocated >= 64 * MiB, f"{allocated} bytes of the memfd allocated"
        assert stats["map_cost"] == "real" and stats["map_cost_bytes"] == 64 * MiB
    finally:
        ram.close()


def test_bad_map_cost_options_are_refused_early(image, sock_dir):
    done = subprocess.run(
        [sys.executable, "-m", "pyvhost_user.cli.blk", "--socket-path", str(sock_dir / "x.sock"),
         "--image", str(image), "--map-cost", "simulated", "--map-cost-rate", "-1"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "--map-cost-rate -1.0 is not in 0..3600" in done.stderr
    assert not (sock_dir / "x.sock").exists()
