"""A checker of the Chrome trace event format (the JSON object form), for the tests.

What Perfetto's UI and chrome://tracing need from a file, per the format's
specification ("Trace Event Format", the JSON Object Format section): a
top-level object with a ``traceEvents`` list; every event an object with a
string ``name`` and ``ph``, integer ``pid`` and ``tid``; timed events with a
numeric ``ts`` (microseconds); complete events (``X``) with a non-negative
``dur``; instants (``i``/``I``) with a scope ``s`` of g, p or t; metadata
(``M``) naming processes and threads; ``args`` an object; no NaN or infinity
(not JSON). Returns the problems found, empty when there are none.
"""

from __future__ import annotations

import json
import math
from typing import Any

PHASES = set("BEXiIMCbnesftPNODR")


def chrome_trace_problems(trace: Any) -> list[str]:
    problems: list[str] = []
    try:
        json.dumps(trace, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return [f"not JSON-serialisable as strict JSON: {exc}"]
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        return ["the top level must be an object with a traceEvents list"]
    if trace.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        problems.append(f"displayTimeUnit {trace['displayTimeUnit']!r} is not ms or ns")
    open_spans: dict[tuple[int, int], int] = {}
    for n, event in enumerate(trace["traceEvents"]):
        where = f"event {n}"
        if not isinstance(event, dict):
            problems.append(f"{where} is not an object")
            continue
        ph = event.get("ph")
        if ph not in PHASES:
            problems.append(f"{where}: ph {ph!r} is not an event type")
            continue
        if not isinstance(event.get("name"), str):
            problems.append(f"{where}: name is not a string")
        for key in ("pid", "tid"):
            if not isinstance(event.get(key), int) or isinstance(event.get(key), bool):
                problems.append(f"{where}: {key} is not an integer")
        if "args" in event and not isinstance(event["args"], dict):
            problems.append(f"{where}: args is not an object")
        if ph == "M":
            if event.get("name") in ("process_name", "thread_name") and \
                    not isinstance(event.get("args", {}).get("name"), str):
                problems.append(f"{where}: {event['name']} without args.name")
            continue
        ts = event.get("ts")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts) \
                or ts < 0:
            problems.append(f"{where}: ts {ts!r} is not a non-negative number")
        if ph == "X":
            dur = event.get("dur")
            if not isinstance(dur, (int, float)) or isinstance(dur, bool) or dur < 0:
                problems.append(f"{where}: complete event with dur {dur!r}")
        if ph in ("i", "I") and event.get("s", "t") not in ("g", "p", "t"):
            problems.append(f"{where}: instant scope {event.get('s')!r}")
        if ph == "B":
            key = (event.get("pid"), event.get("tid"))
            open_spans[key] = open_spans.get(key, 0) + 1
        if ph == "E":
            key = (event.get("pid"), event.get("tid"))
            if not open_spans.get(key):
                problems.append(f"{where}: E without a B on its thread")
            else:
                open_spans[key] -= 1
    return problems
