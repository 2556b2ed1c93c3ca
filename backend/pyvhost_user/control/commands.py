"""Sans-IO protocol of the operator control socket (QMP-like JSON lines).

There is no socket here. The server side is a ``ControlConnection``: it is fed
whatever ``recv`` returned (``receive_data``), hands out checked ``Request``
objects (``next_request``) and turns answers and events into bytes
(``data_to_send``). The client side is a ``ClientConnection`` with the same
shape. Both can be driven by any I/O (threads, selectors, asyncio) and fuzzed
with plain bytes.

Wire format: one JSON object per line (``\\n``-terminated, UTF-8; a ``\\r``
before the ``\\n`` and blank lines are tolerated). The server speaks first::

    {"pyvhost-user": {"version": {"package": "0.1.0"}, "capabilities": ["events"]}}

then answers each ``{"execute": NAME, "arguments": {...}, "id": ANY}`` with
``{"return": VALUE, "id": ANY}`` or
``{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}`` (``id`` echoed when
the request had one that could be read), and pushes
``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}``
to clients that completed capabilities negotiation. As in QMP, the first
command must be ``qmp_capabilities`` (alias ``capabilities``).

Errors: every bad input raises a ``RequestError`` subclass (the offending line
was consumed, the stream is still in sync: answer it with ``send_error`` and go
on) or ``LineTooLong`` (the stream cannot be trusted: answer, then drop the
connection; it is sticky). Nothing else escapes ``next_request``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import PyVhostUserError
from .target import ControlError, ControlTarget

_FALLBACK_VERSION: Final = "0.1.0"
_package_version: str | None = None


def package_version() -> str:
    """The installed distribution's version, looked up on first use: reading the
    installed packages' metadata costs more than the rest of start-up."""
    global _package_version
    if _package_version is None:
        try:  # pragma: no cover - depends on how the package is installed
            from importlib.metadata import PackageNotFoundError, version as _dist_version

            _package_version = _dist_version("pyvhost-user")
        except (ImportError, PackageNotFoundError):  # pragma: no cover
            _package_version = _FALLBACK_VERSION
    return _package_version

GREETING_KEY: Final = "pyvhost-user"
CAPABILITIES: Final[tuple[str, ...]] = ("events",)
MAX_LINE_BYTES: Final = 64 * 1024  # one request line, without its newline
MAX_CLIENT_LINE_BYTES: Final = 64 * 1024 * 1024  # replies (mappings lists) may be large
ASID_MAX: Final = 0xFFFFFFFF  # an ASID is a u32 in vhost


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")  # feed more bytes
PEER_CLOSED: Final = _Sentinel("PEER_CLOSED")  # end of stream, nothing left to read
NO_ID: Final = _Sentinel("NO_ID")  # the request carried no (readable) "id"


# -- errors -----------------------------------------------------------------


class ControlProtocolError(PyVhostUserError):
    """Base of the control protocol's errors."""


class RequestError(ControlProtocolError):
    """One request line is refused; the stream is still in sync.

    ``error_class`` is the QMP class of the error response, ``request_id`` the
    id to echo (``NO_ID`` if there was none or it could not be read).
    """

    error_class: str = "GenericError"

    def __init__(self, desc: str, *, request_id: Any = NO_ID) -> None:
        super().__init__(desc)
        self.desc = desc
        self.request_id = request_id


class NotUtf8(RequestError):
    """The line is not valid UTF-8."""


class NotJson(RequestError):
    """The line is not one JSON value (syntax, NaN/Infinity, nesting, duplicate keys)."""


class NotAnObject(RequestError):
    """The line is JSON but not an object."""


class BadRequestMember(RequestError):
    """The object is not a command: no/bad "execute", bad "arguments", unexpected member."""


class UnknownCommand(RequestError):
    """No command of that name."""

    error_class = "CommandNotFound"


class CapabilitiesRequired(RequestError):
    """A command before capabilities negotiation."""

    error_class = "CommandNotFound"


class AlreadyNegotiated(RequestError):
    """qmp_capabilities after negotiation."""

    error_class = "CommandNotFound"


class InvalidArgument(RequestError):
    """Base of argument errors (class InvalidParameter)."""

    error_class = "InvalidParameter"


class UnknownArgument(InvalidArgument):
    """An argument the command does not take."""


class MissingArgument(InvalidArgument):
    """A required argument is absent."""


class WrongArgumentType(InvalidArgument):
    """An argument has the wrong JSON type (a bool is not an int)."""


class ArgumentOutOfRange(InvalidArgument):
    """An argument has the right type but an impossible value."""


class StreamError(ControlProtocolError):
    """The byte stream can no longer be trusted: answer, then drop the connection."""

    error_class: str = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc
        self.request_id = NO_ID


class LineTooLong(StreamError):
    """A line longer than the cap (or a stream with no newline within the cap)."""


class BadServerMessage(ControlProtocolError):
    """Client side: a line from the server that is not a greeting, reply or event."""


# -- line framing ------------------------------------------------------------


class LineBuffer:
    """Splits a byte stream into lines of at most ``max_line_bytes`` (newline excluded).

    ``LineTooLong`` is sticky: once raised, every later call raises it again.
    After end of stream (``receive(b"")``), a last unterminated line is still
    handed out.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer known to hold no newline
        self._eof = False
        self._failed: LineTooLong | None = None

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def receive(self, data: bytes) -> None:
        """Feed bytes; empty data means the peer closed its side."""
        if self._failed:
            raise self._failed
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ValueError("data received after end of stream")
        self._buffer += data

    def next_line(self) -> bytes | _Sentinel:
        """A complete line (without ``\\n``), ``NEED_DATA`` or ``PEER_CLOSED``."""
        if self._failed:
            raise self._failed
        index = self._buffer.find(b"\n", self._scanned)
        if index < 0:
            self._scanned = len(self._buffer)
            if len(self._buffer) > self.max_line_bytes:
                self._fail(f"line longer than {self.max_line_bytes} bytes")
            if self._eof:
                if self._buffer:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    self._scanned = 0
                    return line
                return PEER_CLOSED
            return NEED_DATA
        if index > self.max_line_bytes:
            self._fail(f"line of {index} bytes, longer than {self.max_line_bytes}")
        line = bytes(self._buffer[:index])
        del self._buffer[: index + 1]
        self._scanned = 0
        return line

    def _fail(self, desc: str) -> None:
        self._buffer.clear()
        self._scanned = 0
        self._failed = LineTooLong(desc)
        raise self._failed


# -- strict JSON -------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {key!r}")
        result[key] = value
    return result


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique_object, parse_constant=_reject_constant, strict=True
)


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity and duplicate keys; raises ValueError only."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    # JSONDecodeError, and ValueError for integers of more than 4300 digits,
    # are ValueErrors already.


def dumps_line(obj: Any) -> bytes:
    """One JSON line, ASCII only (non-ASCII escaped), ``\\n``-terminated.

    Raises ``TypeError``/``ValueError`` for what JSON cannot carry (sets,
    bytes, NaN...), so a bad value from the target is caught before it is sent.
    """
    return (json.dumps(obj, allow_nan=False) + "\n").encode("ascii")


# -- commands and their arguments ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Argument:
    """One named argument: a JSON type check, an optional range check, a default."""

    name: str
    kind: str  # "bool" | "int" | "str-list" | "choice"
    required: bool = False
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    help: str = ""
    choices: tuple[str, ...] = ()  # the strings a "choice" takes

    def check(self, command: str, value: Any, request_id: Any) -> Any:
        where = f"{command}: argument '{self.name}'"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise WrongArgumentType(
                    f"{where} must be a boolean, got {_json_type(value)}", request_id=request_id
                )
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise WrongArgumentType(
                    f"{where} must be an integer, got {_json_type(value)}", request_id=request_id
                )
            if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum
            ):
                shown = value if abs(value) < 10**30 else "a huge integer"
                raise ArgumentOutOfRange(
                    f"{where} is {shown}, not in {self.minimum}..{self.maximum}",
                    request_id=request_id,
                )
            return value
        if self.kind == "choice":
            if not isinstance(value, str):
                raise WrongArgumentType(
                    f"{where} must be a string, got {_json_type(value)}", request_id=request_id
                )
            if value not in self.choices:
                raise ArgumentOutOfRange(
                    f"{where} is {_short(value)!r}, not one of {', '.join(self.choices)}",
                    request_id=request_id,
                )
            return value
        if self.kind == "str-list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise WrongArgumentType(
                    f"{where} must be a list of strings, got {_json_type(value)}",
                    request_id=request_id,
                )
            return tuple(value)
        raise AssertionError(f"unknown argument kind {self.kind}")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    help: str
    arguments: tuple[Argument, ...] = ()
    protocol_level: bool = False  # answered by the connection itself, not the target


NEGOTIATION_COMMANDS: Final = frozenset({"qmp_capabilities", "capabilities"})
TRACE_FORMATS: Final = ("chrome", "mermaid", "summary")

_ENABLE = Argument(
    "enable", "str-list", default=(), help="capabilities to enable (only those advertised)"
)

COMMANDS: Final[dict[str, CommandSpec]] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "qmp_capabilities", "end capabilities negotiation", (_ENABLE,), protocol_level=True
        ),
        CommandSpec("capabilities", "alias of qmp_capabilities", (_ENABLE,), protocol_level=True),
        CommandSpec("query-commands", "list the commands", protocol_level=True),
        CommandSpec(
            "query-address-spaces",
            "per ASID: default, state, entries, mapped bytes, groups",
            (Argument("entries", "bool", default=False, help="include every mapping"),),
        ),
        CommandSpec("query-groups", "per virtqueue group: its ASID and queues"),
        CommandSpec(
            "reset-map",
            "return an ASID to its default mapping",
            (
                Argument(
                    "asid", "int", required=True, minimum=0, maximum=ASID_MAX,
                    help="the address space id",
                ),
            ),
        ),
        CommandSpec("query-stats", "counters (translations, misses, IOTLB updates, ...)"),
        CommandSpec("query-status", "device, front-end connection, features, persist policy"),
        CommandSpec(
            "query-flight-recorder",
            "the recorded life-cycle steps, requests and mapping changes, as a trace",
            (
                Argument("format", "choice", default="chrome", choices=TRACE_FORMATS,
                         help="chrome (trace event JSON, opens in Perfetto), mermaid "
                         "(sequence diagram text) or summary (counts only)"),
                Argument("last", "int", default=0, minimum=0, maximum=10_000_000,
                         help="only the last N events (0: all kept)"),
            ),
        ),
    )
}

REQUEST_MEMBERS: Final = frozenset({"execute", "arguments", "id"})


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__  # pragma: no cover - not from JSON


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True, slots=True)
class Request:
    """A checked command: known name, arguments complete (defaults filled) and typed."""

    command: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: Any = NO_ID

    @property
    def has_id(self) -> bool:
        return self.id is not NO_ID


def parse_envelope(line: bytes) -> tuple[CommandSpec, dict[str, Any], Any]:
    """Syntax of one request line: (known command, raw arguments, id); ``RequestError``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8(f"request is not UTF-8 (byte {exc.start})") from None
    try:
        obj = loads_strict(text)
    except ValueError as exc:
        raise NotJson(f"JSON parse error: {_short(str(exc), 120)}") from None
    if not isinstance(obj, dict):
        raise NotAnObject(f"expected a JSON object, got {_json_type(obj)}")
    request_id = obj.get("id", NO_ID)
    unexpected = sorted(set(obj) - REQUEST_MEMBERS)
    if unexpected:
        raise BadRequestMember(
            f"member '{_short(unexpected[0])}' is unexpected (allowed: execute, arguments, id)",
            request_id=request_id,
        )
    if "execute" not in obj:
        raise BadRequestMember("member 'execute' is missing", request_id=request_id)
    name = obj["execute"]
    if not isinstance(name, str):
        raise BadRequestMember(
            f"'execute' must be a string, got {_json_type(name)}", request_id=request_id
        )
    raw_args = obj.get("arguments", {})
    if not isinstance(raw_args, dict):
        raise BadRequestMember(
            f"'arguments' must be an object, got {_json_type(raw_args)}", request_id=request_id
        )
    spec = COMMANDS.get(name)
    if spec is None:
        raise UnknownCommand(f"the command {_short(name)!r} has not been found",
                             request_id=request_id)
    return spec, raw_args, request_id


def parse_request(line: bytes) -> Request:
    """Parse one line (newline excluded) into a ``Request``; raises ``RequestError`` only."""
    spec, raw_args, request_id = parse_envelope(line)
    return Request(spec.name, check_arguments(spec, raw_args, request_id), request_id)


def check_arguments(spec: CommandSpec, raw: Mapping[str, Any], request_id: Any = NO_ID) -> dict:
    known = {a.name: a for a in spec.arguments}
    for name in raw:
        if name not in known:
            takes = ", ".join(known) or "none"
            raise UnknownArgument(
                f"{spec.name}: unknown argument '{_short(name)}' (takes: {takes})",
                request_id=request_id,
            )
    checked: dict[str, Any] = {}
    for arg in spec.arguments:
        if arg.name in raw:
            checked[arg.name] = arg.check(spec.name, raw[arg.name], request_id)
        elif arg.required:
            raise MissingArgument(
                f"{spec.name}: argument '{arg.name}' is required", request_id=request_id
            )
        else:
            checked[arg.name] = arg.default
    return checked


# -- encoding what the server sends --------------------------------------------------


def greeting(version: str | None = None) -> dict[str, Any]:
    return {
        GREETING_KEY: {
            "version": {"package": version or package_version()},
            "capabilities": list(CAPABILITIES),
        }
    }


def encode_return(value: Any, request_id: Any = NO_ID) -> bytes:
    reply: dict[str, Any] = {"return": value}
    if request_id is not NO_ID:
        reply["id"] = request_id
    return dumps_line(reply)


def encode_error(error_class: str, desc: str, request_id: Any = NO_ID) -> bytes:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if request_id is not NO_ID:
        reply["id"] = request_id
    return dumps_line(reply)


def timestamp(seconds_since_epoch: float) -> dict[str, int]:
    seconds = math.floor(seconds_since_epoch)
    micro = min(999_999, int(round((seconds_since_epoch - seconds) * 1_000_000)))
    return {"seconds": int(seconds), "microseconds": micro}


class BadEvent(ControlProtocolError):
    """An event from the target that cannot be sent (not an object, no name, not JSON)."""


def event_time(event: Any, default: float) -> float:
    """The event's own ``"time"`` (epoch seconds, as the back-end stamps it), else ``default``."""
    when = event.get("time") if isinstance(event, Mapping) else None
    if (
        isinstance(when, (int, float))
        and not isinstance(when, bool)
        and math.isfinite(when)
        and 0 <= when < 2**40
    ):
        return float(when)
    return default


def encode_event(event: Mapping[str, Any], when: float) -> bytes:
    """``{"event": NAME, "data": {...}}`` from the target, stamped with ``when`` (epoch).

    Other members of the target's event (such as its ``"time"``) are not sent.
    """
    if not isinstance(event, Mapping):
        raise BadEvent(f"event is a {type(event).__name__}, not a mapping")
    name = event.get("event")
    if not isinstance(name, str) or not name:
        raise BadEvent(f"event without a name: {event!r:.200}")
    data = event.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise BadEvent(f"event {name}: data is a {type(data).__name__}, not a mapping")
    try:
        return dumps_line({"event": name, "data": dict(data), "timestamp": timestamp(when)})
    except (TypeError, ValueError) as exc:
        raise BadEvent(f"event {name}: not JSON-serialisable: {exc}") from None


# -- executing a command against the target ---------------------------------------


def _call_query_address_spaces(target: ControlTarget, args: Mapping[str, Any]) -> Any:
    return target.query_address_spaces(entries=args["entries"])


def _call_reset_map(target: ControlTarget, args: Mapping[str, Any]) -> Any:
    return target.reset_map(args["asid"])


def _call_query_flight_recorder(target: ControlTarget, args: Mapping[str, Any]) -> Any:
    return target.flight_recorder(args["format"], args["last"] or None)


TARGET_CALLS: Final[dict[str, Callable[[ControlTarget, Mapping[str, Any]], Any]]] = {
    "query-address-spaces": _call_query_address_spaces,
    "query-groups": lambda target, _args: target.query_groups(),
    "reset-map": _call_reset_map,
    "query-stats": lambda target, _args: target.query_stats(),
    "query-status": lambda target, _args: target.query_status(),
    "query-flight-recorder": _call_query_flight_recorder,
}


def execute(target: ControlTarget, request: Request) -> bytes:
    """Run a target command and encode its answer (the target's value as is).

    ``ControlError`` becomes an error response of its class. Anything else the
    target raises, or a value JSON cannot carry, propagates: it is a bug of
    the target, for the caller to log and answer with ``internal_error``.
    """
    call = TARGET_CALLS[request.command]
    try:
        value = call(target, request.arguments)
    except ControlError as exc:
        return encode_error(exc.error_class or "GenericError", exc.desc, request.id)
    if isinstance(value, tuple):
        value = list(value)
    return encode_return(value, request.id)


def internal_error(request: Request, exc: BaseException) -> bytes:
    return encode_error(
        "GenericError", f"{request.command}: internal error: {type(exc).__name__}: {exc}",
        request.id,
    )


# -- server side ----------------------------------------------------------------


class ControlConnection:
    """Server side of one control connection, without I/O.

    On creation the greeting is already waiting in ``data_to_send()``.
    ``next_request`` answers the protocol-level commands itself (capabilities
    negotiation, ``query-commands``) and returns only target commands.
    """

    def __init__(
        self, *, max_line_bytes: int = MAX_LINE_BYTES, package_version: str | None = None
    ) -> None:
        self._lines = LineBuffer(max_line_bytes)
        self._out = bytearray(dumps_line(greeting(package_version)))
        self.negotiated = False
        self.enabled_capabilities: tuple[str, ...] = ()

    @property
    def eof(self) -> bool:
        return self._lines.eof

    def receive_data(self, data: bytes) -> None:
        """Feed what ``recv`` returned; ``b""`` means the peer closed its side."""
        self._lines.receive(data)

    def next_request(self) -> Request | _Sentinel:
        """The next target command, ``NEED_DATA`` or ``PEER_CLOSED``.

        Raises ``RequestError`` (line consumed: ``send_error(exc)`` and go on)
        or ``LineTooLong`` (sticky: ``send_error(exc)``, flush, drop).
        """
        while True:
            line = self._lines.next_line()
            if isinstance(line, _Sentinel):
                return line
            if not line.strip():
                continue  # blank lines (and a lone "\r") are ignored
            spec, raw_args, request_id = parse_envelope(line)
            if spec.name not in NEGOTIATION_COMMANDS and not self.negotiated:
                raise CapabilitiesRequired(
                    "expecting capabilities negotiation with 'qmp_capabilities'",
                    request_id=request_id,
                )
            request = Request(spec.name, check_arguments(spec, raw_args, request_id), request_id)
            if request.command in NEGOTIATION_COMMANDS:
                self._negotiate(request)
                continue
            if request.command == "query-commands":
                self._out += encode_return(
                    [{"name": name} for name in COMMANDS], request.id
                )
                continue
            return request

    def _negotiate(self, request: Request) -> None:
        if self.negotiated:
            raise AlreadyNegotiated(
                "capabilities negotiation is already complete, command ignored",
                request_id=request.id,
            )
        enable = request.arguments["enable"]
        for capability in enable:
            if capability not in CAPABILITIES:
                raise ArgumentOutOfRange(
                    f"{request.command}: capability {_short(capability)!r} is not offered "
                    f"(offered: {', '.join(CAPABILITIES)})",
                    request_id=request.id,
                )
        self.negotiated = True
        self.enabled_capabilities = tuple(dict.fromkeys(enable))
        self._out += encode_return({}, request.id)

    def send(self, data: bytes) -> None:
        """Queue an encoded reply (from ``execute``, ``encode_return``...)."""
        self._out += data

    def send_return(self, request: Request, value: Any) -> None:
        self._out += encode_return(value, request.id)

    def send_error(self, error: RequestError | StreamError | ControlError,
                   request: Request | None = None) -> None:
        request_id = request.id if request is not None else getattr(error, "request_id", NO_ID)
        self._out += encode_error(error.error_class, error.desc, request_id)

    def send_event(self, line: bytes) -> bool:
        """Queue an encoded event (``encode_event``); only once negotiated."""
        if not self.negotiated:
            return False
        self._out += line
        return True

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data


# -- client side ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    package_version: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Return:
    value: Any
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class ErrorReply:
    error_class: str
    desc: str
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class EventMessage:
    name: str
    data: dict[str, Any]
    seconds: int
    microseconds: int

    @property
    def time(self) -> float:
        return self.seconds + self.microseconds / 1_000_000


ServerMessage = Greeting | Return | ErrorReply | EventMessage


def encode_command(command: str, arguments: Mapping[str, Any] | None = None,
                   request_id: Any = NO_ID) -> bytes:
    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = dict(arguments)
    if request_id is not NO_ID:
        request["id"] = request_id
    return dumps_line(request)


def parse_server_message(line: bytes) -> ServerMessage:
    """One server line; raises ``BadServerMessage`` only."""
    try:
        obj = loads_strict(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadServerMessage(f"server sent a line that is not JSON: {_short(str(exc))}") from None
    if not isinstance(obj, dict):
        raise BadServerMessage(f"server sent a JSON {_json_type(obj)}, not an object")
    reply_id = obj.get("id", NO_ID)
    if "return" in obj:
        return Return(obj["return"], reply_id)
    if "error" in obj:
        error = obj["error"]
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("class"), str)
            or not isinstance(error.get("desc"), str)
        ):
            raise BadServerMessage(f"malformed error reply: {_short(repr(error))}")
        return ErrorReply(error["class"], error["desc"], reply_id)
    if "event" in obj:
        name, data, stamp = obj["event"], obj.get("data", {}), obj.get("timestamp", {})
        if not isinstance(name, str) or not isinstance(data, dict) or not isinstance(stamp, dict):
            raise BadServerMessage("malformed event")
        seconds, micro = stamp.get("seconds", 0), stamp.get("microseconds", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seconds, micro)):
            raise BadServerMessage("malformed event timestamp")
        return EventMessage(name, data, seconds, micro)
    if GREETING_KEY in obj:
        body = obj[GREETING_KEY]
        try:
            package = body["version"]["package"]
            capabilities = tuple(body.get("capabilities", ()))
        except (TypeError, KeyError, AttributeError):
            raise BadServerMessage("malformed greeting") from None
        if not isinstance(package, str) or not all(isinstance(c, str) for c in capabilities):
            raise BadServerMessage("malformed greeting")
        return Greeting(package, capabilities)
    raise BadServerMessage(f"unexpected message with members {sorted(obj)[:5]}")


class ClientConnection:
    """Client side of a control connection, without I/O."""

    def __init__(self, *, max_line_bytes: int = MAX_CLIENT_LINE_BYTES) -> None:
        self._lines = LineBuffer(max_line_bytes)

    def receive_data(self, data: bytes) -> None:
        self._lines.receive(data)

    def next_message(self) -> ServerMessage | _Sentinel:
        """A server message, ``NEED_DATA`` or ``PEER_CLOSED``.

        Raises ``BadServerMessage`` or ``LineTooLong``.
        """
        while True:
            line = self._lines.next_line()
            if isinstance(line, _Sentinel):
                return line
            if line.strip():
                return parse_server_message(line)
