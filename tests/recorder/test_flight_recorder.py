"""The flight recorder's ring buffer and its two exports."""

from __future__ import annotations

import json
import threading

from chrome_trace_format import chrome_trace_problems
from pyvhost_user.recorder import FlightRecorder, chrome_trace, merge_chrome_traces, mermaid_sequence
from pyvhost_user.recorder.chrome_trace import events_from_chrome


def test_the_oldest_events_go_first_and_are_counted():
    recorder = FlightRecorder(capacity=3)
    for n in range(5):
        recorder.instant("life-cycle", f"E{n}", n=n)
    assert [e.name for e in recorder.events()] == ["E2", "E3", "E4"]
    assert recorder.describe() | {} == {"capacity": 3, "kept": 3, "recorded": 5, "dropped": 2,
                                        "process": "back-end"}
    assert [e.name for e in recorder.events(last=2)] == ["E3", "E4"]


def test_a_span_is_placed_at_its_start_and_keeps_args_added_inside():
    recorder = FlightRecorder()
    with recorder.span("vhost-user", "SET_STATUS", request="SET_STATUS 0") as args:
        recorder.instant("life-cycle", "DEVICE_RESET")
        args["answer"] = "ack 0"
    span, instant = recorder.events()
    assert (span.name, instant.name) == ("SET_STATUS", "DEVICE_RESET")  # time order
    assert span.dur_ns is not None and span.ts_ns <= instant.ts_ns <= span.ts_ns + span.dur_ns
    assert span.args == {"request": "SET_STATUS 0", "answer": "ack 0"}


def test_recording_from_many_threads_loses_nothing_but_the_overflow():
    recorder = FlightRecorder(capacity=10_000)

    def worker(k: int) -> None:
        for n in range(1000):
            recorder.instant("io", "X", k=k, n=n)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = recorder.events()
    assert len(events) == 8000
    assert sorted((e.args["k"], e.args["n"]) for e in events) == \
        [(k, n) for k in range(8) for n in range(1000)]


def test_chrome_export_is_valid_and_round_trips():
    recorder = FlightRecorder()
    recorder.instant("mapping", "MAP", asid=0, iova=0x5A00_0000_0000_0000, size=1 << 30)
    with recorder.span("vhost-user", "GET_VRING_BASE", request="GET_VRING_BASE index=0"):
        pass
    trace = chrome_trace(recorder.events(), process="back-end test", pid=42,
                         other=recorder.describe())
    assert chrome_trace_problems(trace) == []
    assert chrome_trace_problems(json.loads(json.dumps(trace))) == []
    instant = next(e for e in trace["traceEvents"] if e["name"] == "MAP")
    assert instant["ph"] == "i" and instant["s"] == "t"
    assert instant["args"]["iova"] == hex(0x5A00_0000_0000_0000)  # beyond 2**53: a string
    span = next(e for e in trace["traceEvents"] if e["name"] == "GET_VRING_BASE")
    assert span["ph"] == "X" and span["dur"] >= 0
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {"back-end test", "MainThread"}
    back = events_from_chrome(trace)
    assert [(e.name, e.category, e.thread) for e in back] == \
        [(e.name, e.category, e.thread) for e in recorder.events()]
    assert all(abs(a.ts_ns - b.ts_ns) <= 1 for a, b in zip(back, recorder.events()))


def test_merged_traces_keep_each_process_apart():
    one, two = FlightRecorder(), FlightRecorder()
    one.instant("vmm", "stop")
    two.instant("life-cycle", "RING_STOPPED")
    merged = merge_chrome_traces([chrome_trace(one.events(), pid=1, process="VMM"),
                                  chrome_trace(two.events(), pid=2, process="back-end")])
    assert chrome_trace_problems(merged) == []
    assert {e["pid"] for e in merged["traceEvents"]} == {1, 2}


def test_a_run_of_map_events_is_one_note_in_the_sequence_diagram():
    recorder = FlightRecorder()
    with recorder.span("vhost-user", "SET_OWNER", request="SET_OWNER"):
        pass
    for n in range(128):
        recorder.instant("mapping", "MAP", asid=0, iova=n << 30, size=1 << 30, map_seconds=0.16)
    recorder.instant("mapping", "MAP", asid=1, iova=0, size=4096)
    recorder.instant("life-cycle", "DEVICE_RESET", cause="RESET_DEVICE", iotlb="kept",
                     address_spaces=[{"asid": 0}])
    text = mermaid_sequence(recorder.events(), title="a; b #1")
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram" and "title a, b no.1" in lines[1]
    assert sum("MAP x128 asid 0" in line for line in lines) == 1
    assert "128.0 GiB" in text and "map cost 20.480 s" in text
    assert sum("MAP asid 1" in line for line in lines) == 1
    assert any("DEVICE_RESET cause=RESET_DEVICE iotlb=kept" in line for line in lines)
    assert "address_spaces" not in text  # tables belong to the JSON trace
    assert any(line.strip().startswith("FE->>BE:") and "SET_OWNER" in line for line in lines)
