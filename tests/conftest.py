"""Suite-wide rules and the fixtures every layer of tests shares.

A skipped test is not a pass: under CI (CI=true) any skip fails the run, so a
missing prerequisite (QEMU, the guest image, qemu-storage-daemon) can never
turn the suite green by silently testing less.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvhost_user.launch.backends import BackendProcess, start_backend


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


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pyvu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(16 << 20))
    return path


@pytest.fixture
def backend_factory(sock_dir: Path, request) -> Iterator[Callable[..., BackendProcess]]:
    started: list[BackendProcess] = []
    request.node.started_backends = started

    def start(kind: str, image: Path, **options) -> BackendProcess:
        socket_path = sock_dir / f"{kind}{len(started)}.sock"
        backend = start_backend(kind, os.fspath(image), socket_path, **options)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        code = backend.stop()
        if backend.kind == "pyvhost":
            # SIGTERM must end our back-end cleanly (the back-end program convention).
            assert code == 0, f"back-end exited with {code} on SIGTERM:\n{backend.log()[-3000:]}"
            assert not backend.socket_path.exists(), "socket file left behind"


@pytest.fixture
def pyvhost(backend_factory, image) -> BackendProcess:
    return backend_factory("pyvhost", image)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show the tail of every back-end's log (the protocol trace included)."""
    report = yield
    if report.failed and call.when == "call":
        for backend in getattr(item, "started_backends", []):
            report.sections.append((f"{backend.kind} back-end log", backend.log()[-6000:]))
    return report
