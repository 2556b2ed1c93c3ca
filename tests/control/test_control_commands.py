"""The control protocol without sockets: bytes in, requests and bytes out."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost_user.control import commands as c
from pyvhost_user.control.commands import (
    NEED_DATA,
    NO_ID,
    PEER_CLOSED,
    ClientConnection,
    ControlConnection,
    ControlProtocolError,
    Request,
    RequestError,
)
from pyvhost_user.control.target import ControlError

pytestmark = pytest.mark.timeout(30)

GREETING = b'{"pyvhost-user": {"version": {"package": "0.1.0"}, "capabilities": ["events"]}}\n'
CAPS = b'{"execute": "qmp_capabilities"}\n'


def negotiated() -> ControlConnection:
    conn = ControlConnection()
    conn.receive_data(CAPS)
    assert conn.next_request() is NEED_DATA
    assert conn.negotiated
    conn.data_to_send()
    return conn


def drain(conn: ControlConnection) -> list[Request]:
    """Every request the buffered bytes hold, answering refusals as a server would."""
    requests = []
    while True:
        try:
            request = conn.next_request()
        except RequestError as exc:
            conn.send_error(exc)
            continue
        if request is NEED_DATA or request is PEER_CLOSED:
            return requests
        requests.append(request)


def replies(conn: ControlConnection) -> list[dict]:
    return [json.loads(line) for line in conn.data_to_send().splitlines()]


SAMPLES = [
    (b'{"execute": "query-address-spaces"}', Request("query-address-spaces", {"entries": False})),
    (
        b'{"execute": "query-address-spaces", "arguments": {"entries": true}, "id": 7}',
        Request("query-address-spaces", {"entries": True}, 7),
    ),
    (b'{"execute": "query-groups", "id": "g"}', Request("query-groups", {}, "g")),
    (b'{"id": null, "execute": "reset-map", "arguments": {"asid": 1}}',
     Request("reset-map", {"asid": 1}, None)),
    (b'{"execute": "query-stats", "arguments": {}}', Request("query-stats", {})),
    (b'{"execute": "query-status", "id": {"a": [1, 2]}}',
     Request("query-status", {}, {"a": [1, 2]})),
]


def test_the_greeting_is_waiting_before_anything_is_received():
    conn = ControlConnection()
    assert conn.data_to_send() == GREETING
    assert conn.data_to_send() == b""
    assert c.parse_server_message(GREETING.rstrip()) == c.Greeting("0.1.0", ("events",))


@pytest.mark.parametrize(("line", "expected"), SAMPLES)
def test_each_command_parses_whole(line, expected):
    conn = negotiated()
    conn.receive_data(line + b"\n")
    assert conn.next_request() == expected
    assert conn.next_request() is NEED_DATA


@pytest.mark.parametrize(("line", "expected"), SAMPLES)
def test_each_command_parses_byte_by_byte(line, expected):
    conn = negotiated()
    got = []
    for byte in line + b"\n":
        conn.receive_data(bytes([byte]))
        got.extend(drain(conn))
    assert got == [expected]


def test_several_commands_in_one_chunk_with_crlf_and_blank_lines():
    conn = ControlConnection()
    data = CAPS + b"\r\n   \n" + b"\r\n".join(line for line, _ in SAMPLES) + b"\r\n"
    conn.receive_data(data)
    assert drain(conn) == [expected for _, expected in SAMPLES]
    assert replies(conn)[1:] == [{"return": {}}]


def test_a_last_line_without_newline_is_served_at_end_of_stream():
    conn = negotiated()
    conn.receive_data(b'{"execute": "query-stats", "id": 1}')
    assert conn.next_request() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_request() == Request("query-stats", {}, 1)
    assert conn.next_request() is PEER_CLOSED
    assert conn.next_request() is PEER_CLOSED


ERRORS = [
    # (line, exception type, QMP class, id echoed)
    (b"\xff\xfe{}", c.NotUtf8, "GenericError", NO_ID),
    (b'{"execute": "query-stats", "id": "\xc3"}', c.NotUtf8, "GenericError", NO_ID),
    (b"{not json", c.NotJson, "GenericError", NO_ID),
    (b'{"execute": "query-stats"} {}', c.NotJson, "GenericError", NO_ID),
    (b'{"execute": "query-stats", "id": NaN}', c.NotJson, "GenericError", NO_ID),
    (b'{"execute": "query-stats", "execute": "query-groups"}', c.NotJson, "GenericError", NO_ID),
    (b"[" * 5000 + b"]" * 5000, c.NotJson, "GenericError", NO_ID),
    (b'{"id": 1' + b"1" * 5000 + b"}", c.NotJson, "GenericError", NO_ID),
    (b'["execute", "query-stats"]', c.NotAnObject, "GenericError", NO_ID),
    (b'"query-stats"', c.NotAnObject, "GenericError", NO_ID),
    (b"42", c.NotAnObject, "GenericError", NO_ID),
    (b'{"id": 3}', c.BadRequestMember, "GenericError", 3),
    (b'{"execute": 5, "id": 3}', c.BadRequestMember, "GenericError", 3),
    (b'{"execute": "query-stats", "arguments": [], "id": 3}', c.BadRequestMember,
     "GenericError", 3),
    (b'{"execute": "query-stats", "exec-oob": "x", "id": 3}', c.BadRequestMember,
     "GenericError", 3),
    (b'{"execute": "quit", "id": 4}', c.UnknownCommand, "CommandNotFound", 4),
    (b'{"execute": "reset-map", "id": 5}', c.MissingArgument, "InvalidParameter", 5),
    (b'{"execute": "reset-map", "arguments": {"asid": true}, "id": 5}', c.WrongArgumentType,
     "InvalidParameter", 5),
    (b'{"execute": "reset-map", "arguments": {"asid": "1"}, "id": 5}', c.WrongArgumentType,
     "InvalidParameter", 5),
    (b'{"execute": "reset-map", "arguments": {"asid": 1.0}, "id": 5}', c.WrongArgumentType,
     "InvalidParameter", 5),
    (b'{"execute": "reset-map", "arguments": {"asid": -1}, "id": 5}', c.ArgumentOutOfRange,
     "InvalidParameter", 5),
    (b'{"execute": "reset-map", "arguments": {"asid": 4294967296}, "id": 5}',
     c.ArgumentOutOfRange, "InvalidParameter", 5),
    (b'{"execute": "reset-map", "arguments": {"asid": 1, "all": true}, "id": 5}',
     c.UnknownArgument, "InvalidParameter", 5),
    (b'{"execute": "query-address-spaces", "arguments": {"entries": 1}, "id": 6}',
     c.WrongArgumentType, "InvalidParameter", 6),
    (b'{"execute": "query-stats", "arguments": {"x": 1}, "id": 6}', c.UnknownArgument,
     "InvalidParameter", 6),
    (b'{"execute": "qmp_capabilities", "id": 8}', c.AlreadyNegotiated, "CommandNotFound", 8),
]


@pytest.mark.parametrize(("line", "kind", "error_class", "request_id"), ERRORS)
def test_every_bad_line_is_a_typed_error_and_the_stream_goes_on(line, kind, error_class,
                                                                request_id):
    conn = negotiated()
    conn.receive_data(line + b"\n" + b'{"execute": "query-groups"}\n')
    with pytest.raises(kind) as info:
        conn.next_request()
    assert info.value.error_class == error_class
    assert info.value.request_id == request_id
    conn.send_error(info.value)
    (reply,) = replies(conn)
    assert reply["error"]["class"] == error_class
    assert reply["error"]["desc"] == info.value.desc
    assert reply.get("id", NO_ID) == request_id
    assert conn.next_request() == Request("query-groups", {})  # still in sync


def test_commands_before_negotiation_are_refused_even_with_bad_arguments():
    conn = ControlConnection()
    conn.data_to_send()
    conn.receive_data(
        b'{"execute": "query-stats", "id": 1}\n'
        b'{"execute": "reset-map", "arguments": {"asid": "x"}, "id": 2}\n'
        b'{"execute": "query-commands", "id": 3}\n'
    )
    for _ in range(3):
        with pytest.raises(c.CapabilitiesRequired) as info:
            conn.next_request()
        assert info.value.error_class == "CommandNotFound"
        assert "qmp_capabilities" in info.value.desc


def test_capabilities_alias_and_enable_argument():
    conn = ControlConnection()
    conn.data_to_send()
    conn.receive_data(b'{"execute": "capabilities", "arguments": {"enable": ["oob"]}, "id": 1}\n')
    with pytest.raises(c.ArgumentOutOfRange, match="not offered"):
        conn.next_request()
    assert not conn.negotiated
    conn.receive_data(
        b'{"execute": "capabilities", "arguments": {"enable": ["events"]}, "id": 2}\n'
    )
    assert conn.next_request() is NEED_DATA
    assert conn.negotiated and conn.enabled_capabilities == ("events",)
    assert replies(conn) == [{"return": {}, "id": 2}]


def test_query_commands_is_answered_by_the_connection():
    conn = negotiated()
    conn.receive_data(b'{"execute": "query-commands", "id": "q"}\n')
    assert conn.next_request() is NEED_DATA
    (reply,) = replies(conn)
    names = {entry["name"] for entry in reply["return"]}
    assert names == {
        "qmp_capabilities", "capabilities", "query-commands", "query-address-spaces",
        "query-groups", "reset-map", "query-stats", "query-status", "query-flight-recorder",
    }
    assert reply["id"] == "q"


def test_a_line_at_the_cap_is_accepted_and_one_byte_more_is_fatal_and_sticky():
    cap = 256
    conn = ControlConnection(max_line_bytes=cap)
    conn.data_to_send()
    body = b'{"execute": "qmp_capabilities"}'
    conn.receive_data(body + b" " * (cap - len(body)) + b"\n")
    assert conn.next_request() is NEED_DATA and conn.negotiated
    conn.receive_data(body + b" " * (cap + 1 - len(body)) + b"\n")
    with pytest.raises(c.LineTooLong) as info:
        conn.next_request()
    assert isinstance(info.value, c.StreamError)
    with pytest.raises(c.LineTooLong):
        conn.next_request()
    with pytest.raises(c.LineTooLong):
        conn.receive_data(b"{}\n")


def test_a_stream_without_newline_is_refused_as_soon_as_it_passes_the_cap():
    conn = negotiated()
    conn.receive_data(b"x" * c.MAX_LINE_BYTES)
    assert conn.next_request() is NEED_DATA
    conn.receive_data(b"x")
    with pytest.raises(c.LineTooLong, match=str(c.MAX_LINE_BYTES)):
        conn.next_request()


def test_events_are_queued_only_once_negotiated():
    line = c.encode_event({"event": "MAP", "data": {"asid": 0, "iova": 4096}}, 1700000000.25)
    assert json.loads(line) == {
        "event": "MAP",
        "data": {"asid": 0, "iova": 4096},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }
    fresh = ControlConnection()
    fresh.data_to_send()
    assert not fresh.send_event(line)
    assert fresh.data_to_send() == b""
    conn = negotiated()
    assert conn.send_event(line)
    assert conn.data_to_send() == line


@pytest.mark.parametrize(
    "event",
    [None, [], {"data": {}}, {"event": ""}, {"event": 5}, {"event": "X", "data": [1]},
     {"event": "X", "data": {"v": {1, 2}}}, {"event": "X", "data": {"v": float("nan")}}],
)
def test_bad_events_from_the_target_are_a_typed_error(event):
    with pytest.raises(c.BadEvent):
        c.encode_event(event, 0.0)


def test_event_without_data_gets_an_empty_object():
    assert json.loads(c.encode_event({"event": "DEVICE_RESET"}, 1.999_999_7))["data"] == {}
    stamp = json.loads(c.encode_event({"event": "X"}, 1.999_999_7))["timestamp"]
    assert stamp == {"seconds": 1, "microseconds": 999_999}


class _Target:
    def reset_map(self, asid):
        if asid == 3:
            raise ControlError("no ASID 3", "DeviceNotFound")
        return {"asid": asid, "entries_dropped": 0, "bytes_unmapped": 0}

    def query_address_spaces(self, *, entries=False):
        return ({"asid": 0, "entries": 0, "mappings": []} if entries else {"asid": 0},)

    def query_stats(self):
        return {"bad": {1, 2}}


def test_execute_renders_the_target_value_and_its_refusals():
    target = _Target()
    ok = c.execute(target, Request("reset-map", {"asid": 1}, 9))
    assert json.loads(ok) == {
        "return": {"asid": 1, "entries_dropped": 0, "bytes_unmapped": 0}, "id": 9
    }
    refused = c.execute(target, Request("reset-map", {"asid": 3}))
    assert json.loads(refused) == {"error": {"class": "DeviceNotFound", "desc": "no ASID 3"}}
    spaces = c.execute(target, Request("query-address-spaces", {"entries": True}))
    assert json.loads(spaces) == {"return": [{"asid": 0, "entries": 0, "mappings": []}]}
    with pytest.raises(TypeError):  # a target bug: the server logs it and answers internal_error
        c.execute(target, Request("query-stats", {}))
    reply = json.loads(c.internal_error(Request("query-stats", {}, 1), TypeError("set")))
    assert reply["error"]["class"] == "GenericError" and reply["id"] == 1


def test_client_connection_reads_every_server_message():
    conn = ClientConnection()
    conn.receive_data(
        GREETING
        + b'{"return": {}, "id": 1}\n'
        + b'{"error": {"class": "GenericError", "desc": "no"}}\n'
        + c.encode_event({"event": "UNMAP", "data": {"asid": 1}}, 5.5)
    )
    assert isinstance(conn.next_message(), c.Greeting)
    assert conn.next_message() == c.Return({}, 1)
    assert conn.next_message() == c.ErrorReply("GenericError", "no")
    assert conn.next_message() == c.EventMessage("UNMAP", {"asid": 1}, 5, 500000)
    assert conn.next_message() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_message() is PEER_CLOSED


@pytest.mark.parametrize(
    "line",
    [b"nope", b"[]", b"{}", b'{"error": "x"}', b'{"event": 1}', b'{"pyvhost-user": 1}',
     b'{"event": "X", "timestamp": {"seconds": true}}'],
)
def test_client_refuses_malformed_server_lines(line):
    with pytest.raises(c.BadServerMessage):
        c.parse_server_message(line)


# -- fuzzing ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                        max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {"execute": st.sampled_from(sorted(c.COMMANDS) + ["nope"]) | json_values},
    optional={
        "arguments": st.dictionaries(st.sampled_from(["asid", "entries", "enable", "x"]),
                                     json_values, max_size=3) | json_values,
        "id": json_values,
        "extra": json_values,
    },
)


def _feed_everything(conn: ControlConnection, chunks: list[bytes]) -> None:
    """Only typed errors may come out; every byte queued for sending is a JSON line."""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while True:
                try:
                    request = conn.next_request()
                except RequestError as exc:
                    conn.send_error(exc)
                    continue
                if request is NEED_DATA or request is PEER_CLOSED:
                    break
                assert isinstance(request, Request) and request.command in c.TARGET_CALLS
                conn.send_return(request, None)
    except c.LineTooLong as exc:
        conn.send_error(exc)
    for line in conn.data_to_send().splitlines():
        json.loads(line)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=80), max_size=8), st.booleans())
def test_random_bytes_only_ever_raise_typed_errors(chunks, negotiate_first):
    conn = ControlConnection(max_line_bytes=128)
    if negotiate_first:
        chunks = [CAPS, *chunks]
    _feed_everything(conn, [*chunks, b""])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_like | json_values, max_size=6), st.integers(1, 40))
def test_random_json_only_ever_raises_typed_errors(objects, chunk_size):
    data = CAPS + b"".join(json.dumps(o).encode() + b"\n" for o in objects)
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    _feed_everything(ControlConnection(), chunks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_server_lines_only_raise_typed_errors(data):
    conn = ClientConnection(max_line_bytes=64)
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        while conn.next_message() not in (NEED_DATA, PEER_CLOSED):
            pass
    except ControlProtocolError:
        pass
