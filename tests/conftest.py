"""Suite-wide rules.

A skipped test is not a pass: under CI (CI=true) any skip fails the run, so a
missing prerequisite (QEMU, the guest image, qemu-storage-daemon) can never
turn the suite green by silently testing less.
"""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        reporter.write_line(
            f"CI: {len(skipped)} test(s) skipped; a skip is not a pass here", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
