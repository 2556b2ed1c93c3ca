"""Events as Chrome trace event JSON (the format Perfetto's UI and chrome://tracing open).

The JSON object format: ``{"traceEvents": [...], "displayTimeUnit": "ms",
"otherData": {...}}``. Spans are complete events (``"ph": "X"`` with ``ts`` and
``dur`` in microseconds), instants are ``"ph": "i"`` with thread scope, and
metadata events (``"ph": "M"``) name the process and its threads. ``ts`` is
CLOCK_MONOTONIC in microseconds, so traces of several processes of one machine
(a front-end and its back-ends) merge on one time line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from .flight_recorder import Event


def chrome_trace(events: Iterable[Event], *, process: str = "back-end", pid: int | None = None,
                 other: dict[str, Any] | None = None) -> dict[str, Any]:
    pid = os.getpid() if pid is None else pid
    tids: dict[str, int] = {}
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process}},
    ]
    body = []
    for event in events:
        tid = tids.setdefault(event.thread, len(tids) + 1)
        item: dict[str, Any] = {
            "name": event.name,
            "cat": event.category,
            "ts": event.ts_ns / 1000,
            "pid": pid,
            "tid": tid,
            "args": _jsonable(event.args),
        }
        if event.dur_ns is None:
            item.update(ph="i", s="t")
        else:
            item.update(ph="X", dur=event.dur_ns / 1000)
        body.append(item)
    for thread, tid in tids.items():
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                    "args": {"name": thread}})
    return {"traceEvents": out + body, "displayTimeUnit": "ms", "otherData": dict(other or {})}


def merge_chrome_traces(traces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One trace of several processes (each already with its own pid)."""
    merged: dict[str, Any] = {"traceEvents": [], "displayTimeUnit": "ms", "otherData": {}}
    for trace in traces:
        merged["traceEvents"].extend(trace["traceEvents"])
        merged["otherData"].update(trace.get("otherData", {}))
    return merged


def write_chrome_trace(trace: dict[str, Any], path: str | os.PathLike[str]) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(trace, f, separators=(",", ":"))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """Event args as JSON can carry them (ints beyond 2**53 as hex strings: addresses)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 1 << 53 else hex(value)
    return str(value)


def events_from_chrome(trace: dict[str, Any]) -> list[Event]:
    """The events of a trace (this module's kind) back as ``Event``s, metadata left out:
    so a trace fetched from a back-end can be merged with local events for a diagram."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in trace["traceEvents"]:
        if e.get("ph") not in ("X", "i"):
            continue
        dur = round(e["dur"] * 1000) if e["ph"] == "X" else None
        out.append(Event(round(e["ts"] * 1000), dur, e.get("cat", ""), e["name"],
                         threads.get((e["pid"], e["tid"]), str(e["tid"])), e.get("args", {})))
    return out
