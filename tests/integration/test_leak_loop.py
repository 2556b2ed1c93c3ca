"""Sessions in a loop against one back-end: no fd, mapping or memory left behind.

Each iteration is a whole front-end life (connect, memory table, rings, I/O)
ended a different way: a clean close, a hang-up with I/O in flight, SIGKILL
of a front-end process mid-I/O, and an IOMMU front-end with the address-space
extension. After each, the test waits for the back-end's "front-end N
disconnected" log line (``LiveBackend``: a pipe read by a thread, no polling)
and samples /proc/PID: the open fds and the mappings must be exactly what they
were after the warm-up, and RSS at the end within a small bound of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from live_backend import LiveBackend
from pyvhost_user.frontend import BlkDriver, BlkRequest
from pyvhost_user.frontend.blk import SECTOR_SIZE

pytestmark = pytest.mark.timeout(300)

ITERATIONS = int(os.environ.get("PYVU_LEAK_ITERATIONS", "50"))
WARM_UP = 4  # one of each kind: whatever a first session creates for good
RSS_SLACK_KIB = 4096
BLOCK = 64 << 10
IMAGE_BYTES = 16 << 20
IMAGE_BLOCKS = IMAGE_BYTES // BLOCK

# A front-end in its own process, killed with SIGKILL while its writes are in flight.
KILLED_FRONTEND = textwrap.dedent(
    """
    import os, sys
    from pyvhost_user.frontend import BlkDriver, BlkRequest
    driver = BlkDriver.connect(sys.argv[1], queue_size=128)
    assert driver.read(0, 4096)
    driver.submit([BlkRequest.write(i * 128, os.urandom(64 << 10)) for i in range(16)])
    print("in flight", flush=True)
    sys.stdin.read()  # until killed
    """
)


@pytest.fixture(params=["threads", "processes"])
def live(tmp_path, request):
    short = Path(tempfile.mkdtemp(prefix="pyvu-leak-"))
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    # The flight recorder is a ring buffer: it grows until full, by design. Small
    # enough to be full after the warm-up, it holds still and anything else shows.
    backend = LiveBackend(image, short / "leak.sock", tmp_path / "backend.log",
                          extra_args=("--flight-recorder", "64", "--queue-workers", request.param))
    try:
        yield backend
    finally:
        code = backend.stop()
        shutil.rmtree(short, ignore_errors=True)
    assert code == 0, f"back-end exited with {code} on SIGTERM:\n{backend.log_tail()}"


def clean_close(backend: LiveBackend, i: int) -> None:
    data = os.urandom(BLOCK)
    sector = (i % IMAGE_BLOCKS) * BLOCK // SECTOR_SIZE
    backend.sessions += 1
    with BlkDriver.connect(backend.socket_path) as driver:
        driver.write(sector, data)
        assert driver.read(sector, BLOCK) == data
        driver.flush()


def hang_up_in_flight(backend: LiveBackend, i: int) -> None:
    backend.sessions += 1
    driver = BlkDriver.connect(backend.socket_path, queue_size=128)
    writes = [BlkRequest.write(k * BLOCK // SECTOR_SIZE, os.urandom(BLOCK)) for k in range(16)]
    driver.submit(writes)
    driver.frontend.sock.close()  # gone, writes in flight
    driver.close()


def sigkill_frontend(backend: LiveBackend, i: int) -> None:
    backend.sessions += 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_FRONTEND, os.fspath(backend.socket_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )
    try:
        assert child.stdout.readline() == b"in flight\n"
        os.kill(child.pid, signal.SIGKILL)  # our own child, by pid
    finally:
        child.wait(30)
        child.stdin.close()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def iommu_extension(backend: LiveBackend, i: int) -> None:
    backend.sessions += 1
    # An extension front-end finds its ASID at the identity default: it maps first (premap).
    with BlkDriver.connect(
        backend.socket_path, iommu="offset", extension=True, premap=True
    ) as driver:
        data = os.urandom(BLOCK)
        driver.write(0, data)
        assert driver.read(0, BLOCK) == data
        driver.frontend.reset_map(0)


KINDS = (clean_close, hang_up_in_flight, sigkill_frontend, iommu_extension)


def sample(backend: LiveBackend) -> tuple[dict[str, str], int, int]:
    return backend.fds(), backend.map_count(), backend.rss_kib()


def test_sessions_leave_no_fd_mapping_or_memory_behind(live):
    for i in range(WARM_UP):
        KINDS[i % len(KINDS)](live, i)
        live.wait_disconnected()
    fds0, maps0, rss0 = sample(live)
    for i in range(ITERATIONS):
        kind = KINDS[i % len(KINDS)]
        kind(live, i)
        reason = live.wait_disconnected()
        fds, maps, _rss = sample(live)
        assert fds == fds0, (
            f"iteration {i} ({kind.__name__}, ended: {reason}): fds "
            f"{ {k: v for k, v in fds.items() if fds0.get(k) != v} } appeared, "
            f"{ {k: v for k, v in fds0.items() if fds.get(k) != v} } went"
        )
        assert maps == maps0, (
            f"iteration {i} ({kind.__name__}, ended: {reason}): {maps} mappings, "
            f"{maps0} after warm-up"
        )
    rss = live.rss_kib()
    print(f"leak loop: {ITERATIONS} sessions; {len(fds0)} fds and {maps0} mappings after each; "
          f"RSS {rss0} KiB after warm-up, {rss} KiB at the end")
    assert rss - rss0 <= RSS_SLACK_KIB, (
        f"RSS grew from {rss0} KiB to {rss} KiB in {ITERATIONS} sessions"
    )
    assert live.alive() and not live.bug_lines, live.bug_lines
