#!/usr/bin/env python3
"""Run the avocado VM suite: one avocado job, one test suite per part of the plan.

    .venv/bin/python tests/avocado/run.py [--results-dir DIR] [--only core,scenarios,...]

Parts (cells in matrix.py):
  core       guest_core.py on all 16 cells of the QEMU matrix
  scenarios  guest_scenarios.py on the 4 covering cells
  frontend   frontend_persist.py on the 4 reference front-end cells (not QEMU)
  host       descriptor.py and libvirt_domain.py (no variants)
  hotplug    guest_scenarios.py test_hot_unplug_and_replug on the covering cells

The job's results (results.json, results.html, each test's debug.log and its
data/ directory with the serial console, QEMU's output, the back-end logs and
the flight recorder traces) go under --results-dir. A summary (status and time
per test, counts, total time) is printed at the end. Exit status: 0 only when
every test passed and at least one ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import matrix  # noqa: E402

SCENARIOS = [f"GuestScenarios.{name}" for name in (
    "test_reboot_loop", "test_rebind", "test_backend_restart_while_idle",
    "test_system_reset_under_io")]
CELL_KEYS = ["qemu", "viommu", "queues", "mode", "persist"]
FRONTEND_KEYS = ["frontend", "queues", "mode", "persist"]


def plan() -> dict[str, dict]:
    rel = os.path.relpath(HERE, REPO)
    return {
        "core": {"resolver.references": [f"{rel}/guest_core.py"],
                 "run.dict_variants": matrix.QEMU_MATRIX,
                 "run.dict_variants.variant_id_keys": CELL_KEYS},
        "scenarios": {"resolver.references": [f"{rel}/guest_scenarios.py:{t}" for t in SCENARIOS],
                      "run.dict_variants": matrix.COVERING,
                      "run.dict_variants.variant_id_keys": CELL_KEYS},
        "frontend": {"resolver.references": [f"{rel}/frontend_persist.py"],
                     "run.dict_variants": matrix.FRONTEND,
                     "run.dict_variants.variant_id_keys": FRONTEND_KEYS},
        "host": {"resolver.references": [f"{rel}/descriptor.py", f"{rel}/libvirt_domain.py"]},
        "hotplug": {"resolver.references": [
                        f"{rel}/guest_scenarios.py:GuestScenarios.test_hot_unplug_and_replug"],
                    "run.dict_variants": matrix.COVERING,
                    "run.dict_variants.variant_id_keys": CELL_KEYS},
    }


DEFAULT_PARTS = "core,scenarios,hotplug,frontend,host"


def summary(job_dir: Path) -> tuple[int, int]:
    """Print status and time per test and the totals; (passed, total)."""
    results = json.loads((job_dir / "results.json").read_text())
    tests = results.get("tests", [])
    print("\navocado summary")
    for t in tests:
        print(f"  {t['status']:6} {t.get('time_elapsed', 0):7.1f} s  {t['id']}")
        if t['status'] != 'PASS':
            reason = str(t.get("fail_reason", "")).splitlines()[0][:300] if t.get(
                "fail_reason") else ""
            print(f"         {reason}\n         logs: {t.get('logdir', '')}")
    counts = {k: results.get(k, 0) for k in ("pass", "errors", "failures", "skip", "warn",
                                                "interrupt", "cancel")}
    print("  " + " | ".join(f"{k} {v}" for k, v in counts.items())
          + f" | total {len(tests)} tests")
    print(f"  sum of test times {results.get('time', 0):.1f} s; results in {job_dir}")
    print(f"  HTML: {job_dir / 'results.html'}")
    passed = sum(1 for t in tests if t["status"] == "PASS")
    return passed, len(tests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path,
                        default=Path(os.environ.get("PVU_AVOCADO_RESULTS",
                                                    REPO / "build" / "avocado-results")))
    parser.add_argument("--only", default=DEFAULT_PARTS,
                        help=f"parts to run, comma-separated (default {DEFAULT_PARTS})")
    # One test at a time by default: two 4-vCPU TCG guests at once on 2 host cores
    # starved a vCPU long enough for the guest to report a soft lockup ("CPU#2
    # stuck for 343s", in a 10-reboot loop) and never finish its boot.
    parser.add_argument("--parallel", type=int, default=1,
                        help="tests at a time (default 1; more only with cores to spare)")
    args = parser.parse_args()

    from avocado.core.job import Job
    from avocado.core.suite import TestSuite

    os.chdir(REPO)   # references are relative to the repository
    parts = plan()
    wanted = [p for p in args.only.split(",") if p]
    unknown = set(wanted) - parts.keys()
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {sorted(parts)}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    job_config = {"run.results_dir": str(args.results_dir.resolve()),
                  "run.max_parallel_tasks": args.parallel,
                  "job.output.testlogs.statuses": ["FAIL", "ERROR", "INTERRUPT"]}
    suites = [TestSuite.from_config(parts[name], name=name, job_config=job_config)
              for name in wanted]
    empty = [s.name for s in suites if not s.tests]
    if empty:
        print(f"avocado: no test found in part(s) {empty}: that is a failure", file=sys.stderr)
        return 1
    start = time.monotonic()
    with Job(job_config, suites) as job:
        rc = job.run()
        job_dir = Path(job.logdir)
    passed, total = summary(job_dir)
    print(f"  wall time {time.monotonic() - start:.1f} s")
    if total == 0:
        print("avocado: no test ran: that is a failure, not a pass", file=sys.stderr)
        return 1
    if passed != total and rc == 0:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
