"""The operator control socket of the real back-end process, with a front-end attached."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyvhost_user.control.client import CommandFailed, ControlClient
from pyvhost_user.frontend import BlkDriver

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def backend_with_control(backend_factory, image, sock_dir):
    control_path = sock_dir / "control.sock"
    backend = backend_factory("pyvhost", image, extra_args=("--control-socket", str(control_path)))
    return backend, control_path


def test_control_socket_is_private_by_default(backend_with_control):
    _, path = backend_with_control
    assert path.stat().st_mode & 0o777 == 0o600


def test_address_spaces_stats_and_reset_map_through_the_socket(backend_with_control, image):
    backend, path = backend_with_control
    with ControlClient(path) as control:
        assert control.execute("query-address-spaces") == []  # nobody connected yet
        with BlkDriver.connect(backend.socket_path) as driver:
            spaces = control.execute("query-address-spaces", {"entries": True})
            assert [s["asid"] for s in spaces] == [0, 1]
            assert all(s["state"] == "empty" and s["mappings"] == [] for s in spaces)
            assert control.execute("query-groups") == [{"group": 0, "asid": 0, "queues": [0]}]
            status = control.execute("query-status")
            assert status["front_end_connected"] and not status["access_platform"]
            assert status["iotlb_persist"] == "negotiated" and not status["persist_active"]
            result = control.execute("reset-map", {"asid": 1})
            assert result["asid"] == 1 and result["entries_dropped"] == 0
            with pytest.raises(CommandFailed) as info:
                control.execute("reset-map", {"asid": 7})
            assert info.value.error_class == "InvalidParameter"
            assert driver.read(0, 4096) == image.read_bytes()[:4096]
            stats = control.execute("query-stats")
            assert stats["reset_maps"] == 1 and stats["read_requests"] >= 1
    assert "reset_map asid 1 (control socket)" in backend.log()


def test_events_follow_the_life_cycle(backend_with_control):
    backend, path = backend_with_control
    with ControlClient(path) as control:
        with BlkDriver.connect(backend.socket_path) as driver:
            driver.reboot()
        names = []
        while "FRONT_END_DISCONNECTED" not in names:
            event = control.next_event(timeout=10)
            assert event is not None, f"events so far: {names}"
            names.append(event.name)
    assert names[0] == "FRONT_END_CONNECTED"
    assert "DEVICE_RESET" in names


def test_vhost_user_ctl_prints_a_table(backend_with_control):
    backend, path = backend_with_control
    with BlkDriver.connect(backend.socket_path):
        table = subprocess.run(
            [sys.executable, "-m", "pyvhost_user.cli.ctl", "--socket", str(path),
             "query-address-spaces"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        raw = subprocess.run(
            [sys.executable, "-m", "pyvhost_user.cli.ctl", "--socket", str(path), "--json",
             "query-status"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    assert "ASID" in table and "empty" in table
    assert json.loads(raw)["front_end_connected"] is True
