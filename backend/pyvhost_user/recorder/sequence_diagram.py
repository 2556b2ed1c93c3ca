"""Events as a Mermaid sequence diagram: who asked what, what happened to the mappings.

A person reads it top to bottom: front-end requests as arrows to the back-end
(with the time since the first event shown, and how long the back-end took
when that is over a millisecond), life-cycle steps and mapping changes as
notes. Runs of IOTLB updates collapse into one note ("MAP x128, 128.0 GiB"),
or a migration's thousand updates would bury the steps around them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .flight_recorder import Event

PARTICIPANTS = (("FE", "front-end"), ("BE", "back-end"), ("OP", "operator"))
MAP_EVENTS = frozenset({"MAP", "UNMAP"})


def mermaid_sequence(events: Iterable[Event], *, title: str | None = None) -> str:
    events = list(events)
    lines = ["sequenceDiagram"]
    if title:
        lines.append(f"    title {_text(title)}")
    for short, name in PARTICIPANTS:
        lines.append(f"    participant {short} as {name}")
    if not events:
        lines.append("    Note over FE,BE: no events recorded")
        return "\n".join(lines) + "\n"
    origin = events[0].ts_ns
    i = 0
    while i < len(events):
        event = events[i]
        if event.category == "mapping" and event.name in MAP_EVENTS:
            run = _run(events, i)
            lines.append(_map_note(run, origin))
            i += len(run)
            continue
        lines.extend(_lines(event, origin))
        i += 1
    return "\n".join(lines) + "\n"


def _run(events: Sequence[Event], start: int) -> list[Event]:
    """Consecutive mapping events of one kind and one ASID."""
    first = events[start]
    run = [first]
    for event in events[start + 1 :]:
        if (event.category, event.name) != (first.category, first.name) or \
                event.args.get("asid") != first.args.get("asid"):
            break
        run.append(event)
    return run


def _map_note(run: list[Event], origin: int) -> str:
    first = run[0]
    total = sum(int(e.args.get("size", 0)) for e in run)
    count = f" x{len(run)}" if len(run) > 1 else ""
    cost = sum(float(e.args.get("map_seconds", 0.0)) for e in run)
    extra = f", map cost {cost:.3f} s" if cost else ""
    where = f"iova {int(first.args.get('iova', 0)):#x}" if len(run) == 1 else "from iova " \
        f"{int(first.args.get('iova', 0)):#x}"
    text = f"{_at(first, origin)} {first.name}{count} asid {first.args.get('asid')} {where}, " \
        f"{_size(total)}{extra}"
    return f"    Note over BE: {_text(text)}"


def _lines(event: Event, origin: int) -> list[str]:
    at = _at(event, origin)
    args = event.args
    if event.category == "vhost-user":
        took = "" if event.dur_ns is None or event.dur_ns < 1_000_000 else \
            f" ({event.dur_ns / 1e6:.1f} ms)"
        asked = _text(f"{at} {args.get('request', event.name)}")
        out = [f"    FE->>BE: {asked}"]
        answer = args.get("answer")
        if answer:
            out.append(f"    BE-->>FE: {_text(str(answer) + took)}")
        elif took:
            out.append(f"    Note right of BE: {_text('took' + took)}")
        return out
    detail = _args(args)
    if event.category == "control":
        return [f"    OP->>BE: {_text(f'{at} {event.name} {detail}')}"]
    if event.category == "vmm":
        span = "" if event.dur_ns is None else f" ({event.dur_ns / 1e6:.1f} ms)"
        return [f"    Note over FE: {_text(f'{at} {event.name}{span} {detail}')}"]
    return [f"    Note over BE: {_text(f'{at} {event.name} {detail}')}"]


def _at(event: Event, origin: int) -> str:
    return f"+{(event.ts_ns - origin) / 1e9:.3f}s"


def _args(args: dict[str, Any]) -> str:
    parts = []
    for key, value in args.items():
        if isinstance(value, (dict, list)):
            continue  # whole tables (address spaces) belong to the JSON trace
        if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFFF:
            value = hex(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _text(text: str) -> str:
    # ';' ends a statement and '#' starts an entity code in Mermaid.
    return text.replace(";", ",").replace("#", "no.").strip()
