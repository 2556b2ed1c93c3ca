"""ControlServer over a real Unix socket, with a fake ControlTarget."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading

import pytest

from pyvhost_user.control.server import ControlServer

pytestmark = pytest.mark.timeout(30)


def test_greeting_comes_first(client_factory):
    client = client_factory(negotiate=False)
    assert client.read() == {
        "pyvhost-user": {"version": {"package": "0.1.0"}, "capabilities": ["events"]}
    }


def test_commands_need_capabilities_negotiation_first(client_factory, target):
    client = client_factory(negotiate=False)
    client.read()
    reply = client.call("query-stats", request_id=1)
    assert reply["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in reply["error"]["desc"] and reply["id"] == 1
    assert target.calls == []
    assert client.call("qmp_capabilities", request_id=2) == {"return": {}, "id": 2}
    again = client.call("capabilities", request_id=3)
    assert again["error"]["class"] == "CommandNotFound" and again["id"] == 3
    assert client.call("query-stats", request_id=4)["return"]["translations"] == 1234


def test_each_command_returns_what_the_target_gives(client, target):
    spaces = client.call("query-address-spaces", request_id="a")
    assert spaces == {"return": target.query_address_spaces(), "id": "a"}
    assert "mappings" not in spaces["return"][0]
    with_entries = client.call("query-address-spaces", {"entries": True})["return"]
    assert with_entries[1]["mappings"] == target.mappings[1]
    assert client.call("query-groups")["return"] == [{"group": 0, "asid": 0, "queues": [0, 1]}]
    assert client.call("query-stats")["return"] == target.query_stats()
    assert client.call("query-status")["return"]["iotlb_persist"] == "negotiated"
    names = [c["name"] for c in client.call("query-commands")["return"]]
    assert "reset-map" in names
    reply = client.call("reset-map", {"asid": 1}, request_id=5)
    assert reply == {
        "return": {"asid": 1, "entries_dropped": 2, "bytes_unmapped": 0x201000}, "id": 5
    }
    assert ("reset_map", 1) in target.calls


def test_reset_map_refused_by_the_target_is_an_error_reply(client):
    reply = client.call("reset-map", {"asid": 7}, request_id=1)
    assert reply == {
        "error": {"class": "InvalidParameter", "desc": "no address space 7 (the device has 2)"},
        "id": 1,
    }
    assert client.call("query-groups")["return"]  # the connection goes on


def test_a_target_bug_is_logged_and_answered_and_the_server_goes_on(client, caplog):
    with caplog.at_level(logging.ERROR, "pyvhost_user.control"):
        reply = client.call("reset-map", {"asid": 99}, request_id=1)
    assert reply["error"]["class"] == "GenericError"
    assert "internal error" in reply["error"]["desc"] and "fake target has a bug" in \
        reply["error"]["desc"]
    assert any("failed in the target" in r.getMessage() for r in caplog.records)
    assert client.call("query-stats")["return"]


def test_bad_input_is_answered_without_dropping_the_client(client):
    client.send(b"\xff\n{oops\n[1]\n" + b'{"execute": "reset-map", "arguments": {"asid": true}}\n')
    classes = [client.read()["error"]["class"] for _ in range(4)]
    assert classes == ["GenericError", "GenericError", "GenericError", "InvalidParameter"]
    assert client.call("query-groups")["return"]


def test_an_overlong_line_is_answered_then_the_client_dropped(server_factory, connect):
    server = server_factory("small.sock", max_line_bytes=1024)
    client = connect(server.path)
    client.send(b"x" * 2000)  # no newline: refused as soon as it passes the cap
    reply = client.read()
    assert reply["error"]["class"] == "GenericError"
    assert "longer than 1024" in reply["error"]["desc"]
    assert client.read_line() is None
    assert connect(server.path).call("query-groups")["return"]  # others still served


def test_events_reach_every_negotiated_client_and_only_them(client_factory, target):
    first, second = client_factory(), client_factory()
    late = client_factory(negotiate=False)
    late.read()  # greeting only: not negotiated, so no events
    event = {"event": "MAP", "data": {"asid": 1, "iova": 0x1000, "size": 4096, "perm": "rw"}}
    emitter = threading.Thread(target=target.emit, args=(event,))  # from another thread
    emitter.start()
    emitter.join()
    for client in (first, second):
        got = client.read()
        assert got["event"] == "MAP" and got["data"] == event["data"]
        assert set(got["timestamp"]) == {"seconds", "microseconds"}
    # The delivery of that event is over (both got it); the late client's next
    # line must be its own reply, not the event.
    assert late.call("qmp_capabilities") == {"return": {}}


def test_event_timestamps_come_from_the_moment_of_the_event(server_factory, connect, target):
    server = server_factory("clock.sock", clock=lambda: 1700000000.25)
    client = connect(server.path)
    target.emit({"event": "DEVICE_RESET"})
    assert client.read() == {
        "event": "DEVICE_RESET",
        "data": {},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }


def test_an_event_that_carries_its_time_is_stamped_with_it(server_factory, connect, target):
    server = server_factory("clock.sock", clock=lambda: 1700000000.25)
    client = connect(server.path)
    target.emit({"event": "UNMAP", "data": {"asid": 0}, "time": 1600000000.5})
    target.emit({"event": "UNMAP", "data": {"asid": 1}, "time": "yesterday"})
    assert client.read() == {
        "event": "UNMAP",
        "data": {"asid": 0},
        "timestamp": {"seconds": 1600000000, "microseconds": 500000},
    }
    assert client.read()["timestamp"] == {"seconds": 1700000000, "microseconds": 250000}


def test_reset_map_reply_comes_before_the_event_it_causes(client, target):
    assert client.call("reset-map", {"asid": 1})["return"]["entries_dropped"] == 2
    event = client.read()
    assert event["event"] == "RESET_MAP"
    assert event["data"] == {"asid": 1, "entries_dropped": 2, "bytes_unmapped": 0x201000}


def test_a_malformed_event_is_logged_and_skipped(client, target, caplog):
    with caplog.at_level(logging.ERROR, "pyvhost_user.control"):
        target.emit({"event": "MAP", "data": {"bad": object()}})
        target.emit({"event": "UNMAP", "data": {"asid": 0}})
    assert client.read()["event"] == "UNMAP"
    assert any("malformed event" in r.getMessage() for r in caplog.records)


def test_events_from_many_threads_all_arrive_in_order_per_thread(client, target):
    threads = [
        threading.Thread(
            target=lambda n=n: [
                target.emit({"event": "MAP", "data": {"thread": n, "seq": i}}) for i in range(100)
            ]
        )
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    seen: dict[int, list[int]] = {n: [] for n in range(4)}
    for _ in range(400):
        data = client.read()["data"]
        seen[data["thread"]].append(data["seq"])
    for thread in threads:
        thread.join()
    assert all(seqs == list(range(100)) for seqs in seen.values())


def test_a_client_that_never_reads_is_dropped_without_holding_up_the_others(
    server_factory, connect, target, caplog
):
    server = server_factory("slow.sock", max_output_bytes=4096)
    slow = connect(server.path)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    fast = connect(server.path)
    padding = "p" * 1000
    batch = 0
    with caplog.at_level(logging.WARNING, "pyvhost_user.control"):
        # Each batch reaches the fast client in full. Once it has batch n+1, the
        # I/O thread is done delivering batch n to everyone, so the counter is
        # exact (no waiting on time).
        while server.clients_dropped == 0:
            assert batch < 2000, "the slow client was never dropped"
            for i in range(20):
                target.emit({"event": "MAP", "data": {"batch": batch, "i": i, "pad": padding}})
            for i in range(20):
                data = fast.read()["data"]
                assert (data["batch"], data["i"]) == (batch, i)
            batch += 1
    assert server.clients_dropped == 1
    assert any("not reading" in r.getMessage() for r in caplog.records)
    # The slow client finds some events, then the end of the stream.
    lines = 0
    while (line := slow.read_line()) is not None:
        assert json.loads(line)["event"] == "MAP"
        lines += 1
    assert lines > 0
    # The fast client is still served.
    assert fast.call("query-stats")["return"]
    assert server.client_count == 1


def test_a_client_that_pipelines_without_reading_gets_every_reply(server_factory, connect):
    server = server_factory("pipeline.sock", max_output_bytes=4096)
    client = connect(server.path)
    count = 2000
    requests = b"".join(
        json.dumps({"execute": "query-address-spaces", "arguments": {"entries": True},
                    "id": i}).encode() + b"\n"
        for i in range(count)
    )
    sender = threading.Thread(target=client.send, args=(requests,))
    sender.start()
    for i in range(count):
        reply = client.read()
        assert reply["id"] == i and reply["return"][1]["entries"] == 2
    sender.join()
    assert server.clients_dropped == 0


def test_socket_is_created_0600_by_default(server):
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_socket_mode_can_be_chosen(server_factory):
    server = server_factory("group.sock", mode=0o660)
    assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o660


def test_close_unlinks_the_socket_joins_the_thread_and_disconnects(server, client, target):
    thread = server._thread
    assert thread is not None and thread.is_alive()
    server.close()
    assert not os.path.exists(server.path)
    assert not thread.is_alive()
    assert client.read_line() is None
    assert target.listeners == []
    server.close()  # idempotent


def test_a_stale_socket_is_replaced(sock_dir, target):
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    with ControlServer(path, target) as server:
        assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o600
    assert not path.exists()


def test_a_live_socket_or_another_file_is_never_replaced(sock_dir, target):
    regular = sock_dir / "file"
    regular.write_text("keep me")
    with pytest.raises(ValueError, match="not a socket"):
        ControlServer(regular, target).start()
    assert regular.read_text() == "keep me"
    live = sock_dir / "live.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(live))
    holder.listen(1)
    try:
        with pytest.raises(ValueError, match="in use"):
            ControlServer(live, target).start()
        assert live.exists()
    finally:
        holder.close()
    assert target.listeners == []


def test_clients_over_the_limit_are_refused_with_a_message(server_factory, connect):
    server = server_factory("few.sock", max_clients=1)
    first = connect(server.path)
    extra = connect(server.path, negotiate=False)
    reply = extra.read()
    assert reply["error"]["class"] == "GenericError" and "too many" in reply["error"]["desc"]
    assert extra.read_line() is None
    assert first.call("query-groups")["return"]
    assert server.clients_refused == 1


def test_a_client_vanishing_mid_line_does_not_disturb_the_others(client_factory):
    gone = client_factory()
    gone.send(b'{"execute": "query-st')
    gone.close()
    other = client_factory()
    assert other.call("query-stats")["return"]
