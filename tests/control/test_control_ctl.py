"""vhost-user-ctl as a program, against a ControlServer on the fake target."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import pytest

from pyvhost_user.cli.ctl import format_event, human_bytes
from pyvhost_user.control.commands import EventMessage

pytestmark = pytest.mark.timeout(30)

PROGRAM = [sys.executable, "-m", "pyvhost_user.cli.ctl"]


def ctl(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROGRAM, "--socket", str(server.path), *args], capture_output=True, text=True, timeout=25
    )


def test_query_address_spaces_prints_a_table(server):
    result = ctl(server, "query-address-spaces")
    assert result.returncode == 0, result.stderr
    header, asid0, asid1 = result.stdout.splitlines()
    assert header.split() == ["ASID", "DEFAULT", "STATE", "ENTRIES", "MAPPED", "GROUPS", "TOUCHED"]
    assert asid0.split() == ["0", "identity", "passthrough", "0", "0", "B", "0", "no"]
    assert asid1.split() == ["1", "empty", "mapped", "2", "2.0", "MiB", "-", "yes"]


def test_query_address_spaces_with_entries_lists_the_mappings(server):
    result = ctl(server, "query-address-spaces", "--entries")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ASID 0: no mappings" in out
    assert "ASID 1 mappings:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  0x")]
    assert rows == [
        ["0x1000", "4.0", "KiB", "0x7f0000001000", "rw"],
        ["0x10000", "2.0", "MiB", "0x7f0000100000", "ro"],
    ]


def test_json_output_is_the_reply_value(server, target):
    for args in (["--json", "query-address-spaces", "--entries"],
                 ["query-address-spaces", "--entries", "--json"]):
        result = ctl(server, *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == target.query_address_spaces(entries=True)


def test_groups_stats_status_and_commands(server):
    groups = ctl(server, "query-groups")
    assert groups.returncode == 0
    assert groups.stdout.splitlines()[1].split() == ["0", "0", "0,1"]
    stats = ctl(server, "query-stats")
    assert stats.returncode == 0
    counters = dict(line.split() for line in stats.stdout.splitlines())
    assert counters == {"translations": "1234", "misses": "2", "iotlb_updates": "2",
                        "reset_maps": "0"}
    status = ctl(server, "query-status")
    assert status.returncode == 0
    assert "0x0000000300000000" in status.stdout
    assert "0x0f (ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK)" in status.stdout
    assert "front_end_connected  yes" in status.stdout
    commands = ctl(server, "query-commands")
    assert "reset-map" in commands.stdout.split()


def test_reset_map_reports_what_it_dropped(server, target):
    result = ctl(server, "reset-map", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "ASID 1: back to its default mapping (2 entries dropped, 2.0 MiB unmapped)"
    )
    assert target.mappings[1] == []
    assert json.loads(ctl(server, "--json", "reset-map", "0x1").stdout)["entries_dropped"] == 0


def test_reset_map_refused_by_the_back_end_exits_1_with_its_reason(server):
    result = ctl(server, "reset-map", "7")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "reset-map: no address space 7 (the device has 2) (InvalidParameter)" in result.stderr


@pytest.mark.parametrize("asid", ["x", "-1", "4294967296"])
def test_bad_asid_is_a_usage_error(server, asid):
    result = ctl(server, "reset-map", "--", asid) if asid.startswith("-") else \
        ctl(server, "reset-map", asid)
    assert result.returncode == 2
    assert "ASID" in result.stderr or "argument" in result.stderr


def test_raw_sends_the_request_and_prints_the_reply(server):
    ok = ctl(server, "raw", '{"execute": "query-groups", "id": 3}')
    assert ok.returncode == 0
    assert json.loads(ok.stdout) == {"return": [{"group": 0, "asid": 0, "queues": [0, 1]}], "id": 3}
    refused = ctl(server, "raw", '{"execute": "reset-map", "arguments": {"asid": true}}')
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"]["class"] == "InvalidParameter"
    bad = ctl(server, "raw", "{nope")
    assert bad.returncode == 2 and "not JSON" in bad.stderr


def test_no_server_is_a_clear_connection_error(sock_dir):
    result = subprocess.run(
        [*PROGRAM, "--socket", str(sock_dir / "absent.sock"), "query-stats"],
        capture_output=True, text=True, timeout=25,
    )
    assert result.returncode == 3
    assert "cannot connect to" in result.stderr and "absent.sock" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_listener_that_never_answers_times_out(sock_dir):
    import socket

    path = sock_dir / "mute.sock"
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(path))
    mute.listen(1)
    try:
        result = subprocess.run(
            [*PROGRAM, "--socket", str(path), "--timeout", "0.5", "query-stats"],
            capture_output=True, text=True, timeout=25,
        )
    finally:
        mute.close()
    assert result.returncode == 3
    assert "no answer" in result.stderr


def _follow(server, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*PROGRAM, "--socket", str(server.path), *extra, "events"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready = _readline_within(process.stderr)
    assert "following events" in ready, ready  # negotiated: events will reach it
    return process


def _readline_within(stream, timeout: float = 20.0) -> str:
    """readline() bounded by a timeout (a thread, joined; no sleeping)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box, "no line in time"
    return box[0]


def test_events_are_followed_until_ctrl_c(server, target):
    process = _follow(server)
    try:
        target.emit({"event": "MAP", "data": {"asid": 1, "iova": 0x10000, "size": 4096}})
        target.emit({"event": "DEVICE_RESET", "data": {}})
        first = _readline_within(process.stdout)
        second = _readline_within(process.stdout)
        assert first.split()[2:] == ["MAP", "asid=1", "iova=0x10000", "size=0x1000"]
        assert second.split()[2:] == ["DEVICE_RESET"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.communicate()


def test_events_json_lines(server, target):
    process = _follow(server, "--json")
    try:
        target.emit({"event": "UNMAP", "data": {"asid": 0, "iova": 0, "size": 4096}})
        event = json.loads(_readline_within(process.stdout))
        assert event["event"] == "UNMAP" and event["data"] == {"asid": 0, "iova": 0, "size": 4096}
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.communicate()


def test_events_end_with_an_error_when_the_back_end_goes_away(server):
    process = _follow(server)
    server.close()
    _out, err = process.communicate(timeout=20)
    assert process.returncode == 3
    assert "closed by the server" in err


def test_formatting_helpers():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 << 20, 1 << 64)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "16.0 EiB"
    ]
    line = format_event(EventMessage("QUEUE_BROKEN", {"queue": 0, "reason": "bad chain"}, 0, 5))
    assert line.endswith('.000005 QUEUE_BROKEN queue=0 reason="bad chain"')
