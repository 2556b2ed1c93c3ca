"""``vhost-user-ctl``: talk to a running back-end's control socket.

    vhost-user-ctl --socket PATH query-address-spaces [--entries]
    vhost-user-ctl --socket PATH query-groups
    vhost-user-ctl --socket PATH reset-map ASID
    vhost-user-ctl --socket PATH query-stats | query-status | query-commands
    vhost-user-ctl --socket PATH query-flight-recorder [--format chrome|mermaid|summary] [-o F]
    vhost-user-ctl --socket PATH events            # follow until Ctrl-C
    vhost-user-ctl --socket PATH raw '{"execute": "query-stats"}'

Readable output by default; ``--json`` (before or after the command) prints
the reply's value as JSON instead (events: one JSON line each, as received).

Exit status: 0 success (and Ctrl-C while following events), 1 the back-end
refused the command (error reply), 2 bad command line, 3 cannot connect, the
connection broke or the server did not answer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from ..control.client import CommandFailed, ControlClient
from ..control.commands import (
    ASID_MAX,
    NO_ID,
    TRACE_FORMATS,
    ControlProtocolError,
    ErrorReply,
    EventMessage,
    loads_strict,
)

PROG = "vhost-user-ctl"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3

VIRTIO_STATUS_BITS = (
    (1, "ACKNOWLEDGE"),
    (2, "DRIVER"),
    (4, "DRIVER_OK"),
    (8, "FEATURES_OK"),
    (64, "NEEDS_RESET"),
    (128, "FAILED"),
)
IOTLB_PERMS = {0: "none", 1: "ro", 2: "wo", 3: "rw"}  # VHOST_ACCESS_*


# -- formatting -----------------------------------------------------------------------


def human_bytes(n: Any) -> str:
    if isinstance(n, bool) or not isinstance(n, int):
        return _cell(n)
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _hex(n: Any) -> str:
    if isinstance(n, int) and not isinstance(n, bool):
        return f"{n:#x}"
    return _cell(n)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _perm(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return IOTLB_PERMS.get(value, str(value))
    return _cell(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, indent: str = "") -> str:
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [headers, *rows]
    return "\n".join(
        indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in lines
    )


def format_address_spaces(spaces: Any) -> str:
    if not isinstance(spaces, list):
        return _pretty(spaces)
    if not spaces:
        return "no address spaces"
    rows = []
    for space in spaces:
        s = space if isinstance(space, dict) else {}
        rows.append([
            _cell(s.get("asid")),
            _cell(s.get("default")),
            _cell(s.get("state")),
            _cell(s.get("entries")),
            human_bytes(s.get("mapped_bytes")),
            _cell(s.get("groups")),
            _cell(s.get("touched")),
        ])
    out = [table(["ASID", "DEFAULT", "STATE", "ENTRIES", "MAPPED", "GROUPS", "TOUCHED"], rows)]
    for space in spaces:
        if not isinstance(space, dict) or "mappings" not in space:
            continue
        mappings = space["mappings"] or []
        out.append("")
        if not mappings:
            out.append(f"ASID {_cell(space.get('asid'))}: no mappings")
            continue
        out.append(f"ASID {_cell(space.get('asid'))} mappings:")
        out.append(
            table(
                ["IOVA", "SIZE", "TARGET", "PERM"],
                (
                    [_hex(m.get("iova")), human_bytes(m.get("size")), _target(m),
                     _perm(m.get("perm"))]
                    if isinstance(m, dict) else [_cell(m), "", "", ""]
                    for m in mappings
                ),
                indent="  ",
            )
        )
    return "\n".join(out)


def _target(mapping: dict[str, Any]) -> str:
    """A user address, or "gpa ..." for an entry restored from a migrated device state."""
    if "gpa" in mapping:
        return f"gpa {_hex(mapping.get('gpa'))}"
    return _hex(mapping.get("uaddr"))


def format_groups(groups: Any) -> str:
    if not isinstance(groups, list):
        return _pretty(groups)
    if not groups:
        return "no virtqueue groups"
    rows = [
        [_cell(g.get("group")), _cell(g.get("asid")), _cell(g.get("queues"))]
        if isinstance(g, dict) else [_cell(g), "", ""]
        for g in groups
    ]
    return table(["GROUP", "ASID", "QUEUES"], rows)


def format_reset_map(result: Any) -> str:
    if not isinstance(result, dict):
        return _pretty(result)
    line = (
        f"ASID {_cell(result.get('asid'))}: back to its default mapping "
        f"({_cell(result.get('entries_dropped'))} entries dropped, "
        f"{human_bytes(result.get('bytes_unmapped'))} unmapped)"
    )
    extra = {k: v for k, v in result.items()
             if k not in ("asid", "entries_dropped", "bytes_unmapped")}
    return line + ("\n" + format_mapping(extra) if extra else "")


def format_mapping(values: Any) -> str:
    if not isinstance(values, dict):
        return _pretty(values)
    if not values:
        return "(nothing)"
    width = max(len(str(k)) for k in values)
    return "\n".join(f"{str(k).ljust(width)}  {_cell(v)}" for k, v in values.items())


def format_stats(stats: Any) -> str:
    """Counter names on the left, values right-aligned."""
    if not isinstance(stats, dict):
        return _pretty(stats)
    if not stats:
        return "(no counters)"
    values = {str(k): _cell(v) for k, v in stats.items()}
    name_width = max(len(k) for k in values)
    value_width = max(len(v) for v in values.values())
    return "\n".join(f"{k.ljust(name_width)}  {v.rjust(value_width)}" for k, v in values.items())


def format_status(status: Any) -> str:
    if not isinstance(status, dict):
        return _pretty(status)
    shown: dict[str, str] = {}
    for key, value in status.items():
        if key == "features" and isinstance(value, int) and not isinstance(value, bool):
            shown[key] = f"{value:#018x}"
        elif key == "status" and isinstance(value, int) and not isinstance(value, bool):
            names = [name for bit, name in VIRTIO_STATUS_BITS if value & bit]
            shown[key] = f"{value:#04x}" + (f" ({' | '.join(names)})" if names else "")
        else:
            shown[key] = _cell(value)
    width = max((len(k) for k in shown), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in shown.items())


def format_commands(commands: Any) -> str:
    if not isinstance(commands, list):
        return _pretty(commands)
    return "\n".join(_cell(c.get("name")) if isinstance(c, dict) else _cell(c) for c in commands)


def format_event(event: EventMessage) -> str:
    when = datetime.datetime.fromtimestamp(event.seconds).strftime("%Y-%m-%d %H:%M:%S")
    parts = [f"{when}.{event.microseconds:06d}", event.name]
    for key, value in event.data.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 4096:
            text = f"{value:#x}"
        elif isinstance(value, str) and value and " " not in value:
            text = value
        elif isinstance(value, (dict, list, str)) or value is None:
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = _cell(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2)


FORMATTERS = {
    "query-address-spaces": format_address_spaces,
    "query-groups": format_groups,
    "reset-map": format_reset_map,
    "query-stats": format_stats,
    "query-status": format_status,
    "query-commands": format_commands,
    "query-flight-recorder": lambda value: value if isinstance(value, str) else (
        format_mapping(value) if isinstance(value, dict) and "traceEvents" not in value
        else json.dumps(value)),
}


# -- command line ------------------------------------------------------------------------


def _asid(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= ASID_MAX:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..{ASID_MAX}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Query and control a running pyvhost-user back-end through its control socket.",
        epilog="exit status: 0 ok, 1 refused by the back-end, 2 usage, 3 connection problem",
    )
    p.add_argument("--socket", "-s", required=True, metavar="PATH",
                   help="the back-end's control socket")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait to connect and for each reply (default 10)")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="print JSON instead of tables")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    q = sub.add_parser("query-address-spaces", parents=[json_flag],
                       help="per ASID: default, state, entries, mapped bytes, groups")
    q.add_argument("--entries", action="store_true", help="also list every mapping")
    sub.add_parser("query-groups", parents=[json_flag], help="virtqueue groups and their ASID")
    r = sub.add_parser("reset-map", parents=[json_flag],
                       help="return an address space to its default mapping")
    r.add_argument("asid", type=_asid, metavar="ASID", help="address space id (0x.. accepted)")
    sub.add_parser("query-stats", parents=[json_flag], help="counters")
    sub.add_parser("query-status", parents=[json_flag], help="device and front-end status")
    sub.add_parser("query-commands", parents=[json_flag], help="commands the server knows")
    fr = sub.add_parser("query-flight-recorder", parents=[json_flag],
                        help="the flight recorder: a Chrome/Perfetto trace, a Mermaid "
                        "sequence diagram, or a summary")
    fr.add_argument("--format", choices=TRACE_FORMATS, default="chrome")
    fr.add_argument("--last", type=int, default=0, metavar="N", help="only the last N events")
    fr.add_argument("--output", "-o", metavar="FILE", help="write the trace to FILE")
    sub.add_parser("events", parents=[json_flag],
                   help="print events as they happen, until Ctrl-C")
    raw = sub.add_parser("raw", help="send one JSON request, print the JSON reply")
    raw.add_argument("request", metavar="JSON", help='e.g. \'{"execute": "query-stats"}\'')
    return p


def _arguments(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.command == "query-address-spaces":
        return {"entries": True} if args.entries else None
    if args.command == "reset-map":
        return {"asid": args.asid}
    if args.command == "query-flight-recorder":
        return {"format": args.format, "last": args.last}
    return None


def _write_output(path: str, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    with open(path, "w") as f:
        f.write(text)
    events = len(value["traceEvents"]) if isinstance(value, dict) and "traceEvents" in value \
        else text.count("\n")
    return f"wrote {path} ({events} {'events' if isinstance(value, dict) else 'lines'})"


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raw_line: bytes | None = None
    if args.command == "raw":
        try:
            request = loads_strict(args.request)
        except ValueError as exc:
            _error(f"raw: not JSON: {exc}")
            return EXIT_USAGE
        raw_line = (json.dumps(request) + "\n").encode()
    try:
        client = ControlClient(args.socket, timeout=args.timeout)
    except CommandFailed as exc:
        _error(f"capabilities negotiation refused: {exc.error_class}: {exc.desc}")
        return EXIT_CONNECTION
    except ControlProtocolError as exc:
        _error(str(exc))
        return EXIT_CONNECTION
    except KeyboardInterrupt:
        return 130
    try:
        with client:
            if args.command == "events":
                return _follow_events(client, args.json, args.socket, sys.stdout)
            if raw_line is not None:
                reply = client.request(raw_line, NO_ID)
                shown: dict[str, Any]
                if isinstance(reply, ErrorReply):
                    shown = {"error": {"class": reply.error_class, "desc": reply.desc}}
                else:
                    shown = {"return": reply.value}
                if reply.id is not NO_ID:
                    shown["id"] = reply.id
                print(json.dumps(shown))
                return EXIT_REFUSED if isinstance(reply, ErrorReply) else EXIT_OK
            try:
                value = client.execute(args.command, _arguments(args))
            except CommandFailed as exc:
                _error(f"{exc.command}: {exc.desc} ({exc.error_class})")
                return EXIT_REFUSED
            if getattr(args, "output", None):
                try:
                    print(_write_output(args.output, value))
                except OSError as exc:
                    _error(f"cannot write {args.output}: {exc.strerror}")
                    return EXIT_USAGE
                return EXIT_OK
            print(json.dumps(value, indent=2) if args.json else FORMATTERS[args.command](value))
            return EXIT_OK
    except ControlProtocolError as exc:  # connection lost, timeout, bad server line
        _error(str(exc))
        return EXIT_CONNECTION
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK


def _follow_events(client: ControlClient, as_json: bool, path: str, out: TextIO) -> int:
    print(f"{PROG}: following events on {path} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            event = client.next_event(timeout=None)
            if event is None:  # pragma: no cover - no timeout given
                continue
            if as_json:
                line = json.dumps({
                    "event": event.name,
                    "data": event.data,
                    "timestamp": {"seconds": event.seconds, "microseconds": event.microseconds},
                })
            else:
                line = format_event(event)
            out.write(line + "\n")
            out.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    except ControlProtocolError as exc:
        _error(str(exc))
        return EXIT_CONNECTION
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK


def _quiet_stdout() -> None:
    # Output went to a closed pipe (| head): keep the exit flush from complaining.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())
