"""scripts/migration_lab.py at small sizes: the flows behave as the story says, the outputs open.

The lab's claims are checked by what was sent, not by how long it took: in
the legacy flow the destination maps again inside the downtime (one update per
GiB), with persistence or early mapping nothing is mapped there. The only
timing claim is a lower bound the simulated cost guarantees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chrome_trace_format import chrome_trace_problems

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent
RATE = 0.05
SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "migration_lab.py"), "--sizes",
         ",".join(map(str, SIZES)), "--rate", str(RATE), "--out", str(out)],
        capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_every_flow_and_size_ran_and_the_ratio_is_printed(lab):
    out, stdout = lab
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["flow"], r["size_gib"]) for r in runs) == sorted(
        (f, s) for f in ("legacy", "persist", "early-map") for s in SIZES)
    assert "4 GiB: legacy / persist downtime = " in stdout
    assert "(milliseconds)" in stdout and "first I/O" in stdout
    for run in runs:
        assert set(run["phases_ms"]) == {"stop", "device reset", "map", "ring restart",
                                         "first I/O"}
        assert run["in_flight_at_stop"] == 8


def test_only_legacy_maps_inside_the_downtime_and_pays_for_it(lab):
    out, _ = lab
    runs = {(r["flow"], r["size_gib"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    for size in SIZES:
        legacy = runs[("legacy", size)]
        assert legacy["updates_in_downtime"] == size  # one 1 GiB update per GiB, again
        assert legacy["phases_ms"]["map"] >= size * RATE * 1000  # the modelled pinning
        assert legacy["map_cost_s"] >= size * RATE
        for flow in ("persist", "early-map"):
            other = runs[(flow, size)]
            assert other["updates_in_downtime"] == 0 and other["map_cost_s"] == 0
            assert other["premap_s"] >= size * RATE  # paid before the switch-over instead
        assert runs[("early-map", size)]["phases_ms"]["device reset"] == 0.0


def test_the_plot_trace_and_diagram_are_written(lab):
    out, _ = lab
    svg = (out / "downtime.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3
    trace = json.loads((out / "trace.json").read_text())
    assert chrome_trace_problems(trace) == []
    processes = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert processes == {"VMM (reference front-end)", "source back-end", "destination back-end"}
    assert any(e["name"] == "downtime: map" for e in trace["traceEvents"])
    sequence = (out / "sequence.mmd").read_text()
    assert sequence.startswith("sequenceDiagram") and "legacy flow, 4 GiB" in sequence
    assert "RESET_DEVICE" in sequence and "MAP x4 asid 0" in sequence
