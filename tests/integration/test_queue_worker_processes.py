"""Rings served by worker processes (--queue-workers processes) and by I/O
threads (--io-threads), on the real back-end process.

What a worker process inherited at its fork must never go stale: every request
that changes it restarts the ring (a new child, the same data), and a ring
behind an IOTLB or under dirty logging is served by a thread. Data, counters
and error paths must be the same as with threads.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import struct

import pytest

from pyvhost_user.control.client import ControlClient
from pyvhost_user.frontend import BlkDriver, BlkRequest
from pyvhost_user.frontend.blk import SECTOR_SIZE
from pyvhost_user.frontend.split_ring import VIRTQ_DESC_F_NEXT
from pyvhost_user.launch.backends import kill_backend, start_backend
from pyvhost_user.wire import VirtioFeature as VF

from test_dirty_log import start_logging  # same directory (pytest puts it on sys.path)

pytestmark = pytest.mark.timeout(90)
BLK_IN = 0


@pytest.fixture
def proc_backend(backend_factory, image, sock_dir):
    control = sock_dir / "control.sock"
    backend = backend_factory(
        "pyvhost", image, num_queues=4,
        extra_args=("--queue-workers", "processes", "--io-threads", "2",
                    "--control-socket", str(control)),
    )
    return backend, control


def workers(control_path) -> dict[int, str]:
    """Started rings -> "thread" or "process <pid>"."""
    with ControlClient(control_path) as control:
        return {r["index"]: r["worker"] for r in control.execute("query-status")["rings"]
                if r["worker"] is not None}


def worker_pids(control_path) -> dict[int, int]:
    return {i: int(w.split()[1]) for i, w in workers(control_path).items()
            if w.startswith("process ")}


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether ``pid`` (not our child) has exited within ``timeout``: a pidfd
    becomes readable when it does."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


SLOT = 64 << 10


def write_length(i: int) -> int:
    return 4096 if i % 3 else SLOT  # every third one goes to the I/O threads


def scattered_writes(driver: BlkDriver, image_size: int, count: int, queues: int) -> bytes:
    """``count`` writes spread over the queues, each in a 64 KiB slot of its own
    (requests on different queues may complete in any order)."""
    slots = image_size // SLOT
    assert count <= slots
    expected = bytearray(driver.read_all())
    requests = []
    for i in range(count):
        offset = (i * 97 % slots) * SLOT
        data = os.urandom(write_length(i))
        expected[offset : offset + len(data)] = data
        requests.append(BlkRequest.write(offset // SECTOR_SIZE, data, queue=i % queues))
    driver.run(requests, depth=16)
    driver.flush()
    return bytes(expected)


def test_each_ring_in_its_own_process_serves_the_same_data(proc_backend, image):
    backend, control = proc_backend
    size = image.stat().st_size
    with BlkDriver.connect(backend.socket_path, num_queues=4, queue_size=128) as driver:
        pids = worker_pids(control)
        assert sorted(pids) == [0, 1, 2, 3]
        assert len(set(pids.values())) == 4 and backend.pid not in pids.values()
        expected = scattered_writes(driver, size, 240, 4)
        assert image.read_bytes() == expected
        assert driver.read_all() == expected
        for queue in range(4):
            driver.frontend.stop_queue(queue)
        assert all(wait_exit(pid, 10) for pid in pids.values())
        with ControlClient(control) as c:
            stats = c.execute("query-stats")
        # Counted in the children, added when they stopped.
        assert stats["write_requests"] == 240
        assert stats["write_bytes"] == sum(write_length(i) for i in range(240))
    assert "worker process failed" not in backend.log()


def test_requests_that_change_what_a_child_inherited_restart_it(proc_backend, image):
    backend, control = proc_backend
    data = os.urandom(8192)
    with BlkDriver.connect(backend.socket_path, num_queues=2) as driver:
        fe = driver.frontend
        first = worker_pids(control)
        # A new call eventfd: the old child would go on signalling the old one.
        fe.set_vring_call(0)
        second = worker_pids(control)
        assert second[0] != first[0], "ring 0 was not restarted"
        assert second[1] == first[1], "a request about ring 0 restarted ring 1 too"
        assert wait_exit(first[0], 10)
        driver.write(64, data, queue=0)
        assert driver.read(64, 8192, queue=0) == data
        # Disabled: the child is replaced by one that serves nothing until enabled.
        fe.set_vring_enable(1, False)
        third = worker_pids(control)
        assert third[1] != second[1]
        ticket = driver.submit([BlkRequest.read(64, 8192, queue=1)])
        fe.set_vring_enable(1, True)
        (done,) = driver.wait(ticket)
        assert done.check().data == data
        # A region removed and added again while running (the rings are in the
        # first one): the children must map what the back-end maps now.
        region = driver.ram.regions[1]
        before = worker_pids(control)
        fe.rem_mem_reg(region)
        fe.add_mem_reg(region)
        after = worker_pids(control)
        assert not set(before.values()) & set(after.values())
        buf = driver.ram.alloc_at(region.gpa + 8192, 4096)
        hdr, status = driver.ram.alloc(16), driver.ram.alloc(1)
        driver.ram.write(hdr, struct.pack("<IIQ", BLK_IN, 0, 64))
        used, got = driver.raw([(hdr, 16, False), (buf, 4096, True), (status, 1, True)],
                               status_gpa=status)
        assert (used, got) == (4097, 0)
        assert driver.ram.read(buf, 4096) == data[:4096]


def test_dirty_logging_moves_rings_to_threads_and_back(proc_backend, image):
    backend, control = proc_backend
    with BlkDriver.connect(backend.socket_path, num_queues=2) as driver:
        assert set(workers(control).values()) == {f"process {p}" for p in worker_pids(control).values()}
        log = start_logging(driver)
        assert set(workers(control).values()) == {"thread"}
        hdr, status, data = driver.ram.alloc(16), driver.ram.alloc(1), driver.ram.alloc(4096, 4096)
        driver.ram.write(hdr, struct.pack("<IIQ", BLK_IN, 0, 0))
        driver.raw([(hdr, 16, False), (data, 4096, True), (status, 1, True)], status_gpa=status)
        page = data // 4096
        assert log[page >> 3] & (1 << (page & 7)), "a write during logging was not logged"
        fe = driver.frontend
        fe.set_features(fe.acked_features & ~VF.VHOST_F_LOG_ALL)
        fe.get_features()  # a round trip: SET_FEATURES has been handled
        assert len(worker_pids(control)) == 2
        assert driver.read(0, 4096) == image.read_bytes()[:4096]


def test_a_broken_ring_in_a_child_needs_reset_like_a_thread(proc_backend, image):
    backend, control = proc_backend
    with BlkDriver.connect(backend.socket_path, num_queues=4) as driver:
        pid = worker_pids(control)[0]
        ring = driver.ring(0)
        header = driver.ram.alloc(16)
        driver.ram.write(header, struct.pack("<IIQ", BLK_IN, 0, 0))
        ids = ring.take_descriptors(2)
        ring.write_descriptor(ids[0], header, 16, VIRTQ_DESC_F_NEXT, ids[1])
        ring.write_descriptor(ids[1], header, 16, VIRTQ_DESC_F_NEXT, ids[0])  # a loop
        ring.push_avail(ids[0], ids)
        ring.publish()
        driver.frontend.kick(0)
        err_fd = driver.frontend.queue(0).err_fd
        assert select.select([err_fd], [], [], 10)[0], "the error eventfd was not signalled"
        assert driver.frontend.get_status() & 0x40  # DEVICE_NEEDS_RESET
        assert wait_exit(pid, 10), "the child of a broken ring should end"
        # The other rings go on.
        assert driver.read(8, 4096, queue=1) == image.read_bytes()[4096:8192]
    assert "queue 0: marked broken (device needs reset): " in backend.log()


def test_a_killed_child_is_replaced_and_nothing_is_lost(proc_backend, image):
    backend, control = proc_backend
    data = os.urandom(4096)
    with BlkDriver.connect(backend.socket_path, num_queues=2) as driver:
        driver.write(8, data, queue=0)
        pid = worker_pids(control)[0]
        os.kill(pid, signal.SIGKILL)  # a child of the back-end we started
        assert wait_exit(pid, 10)
        base = driver.frontend.stop_queue(0)
        assert base == driver.ring(0).used_idx  # served again from the used index
        driver.frontend.start_queue(0)
        assert driver.read(8, 4096, queue=0) == data
    log = backend.log()
    assert f"worker process {pid} ended (killed by signal 9) without its report" in log


def test_children_die_with_the_back_end(image, sock_dir):
    control = sock_dir / "control.sock"
    backend = start_backend("pyvhost", image, sock_dir / "killed.sock", num_queues=4,
                            extra_args=("--queue-workers", "processes",
                                        "--control-socket", str(control)))
    try:
        with BlkDriver.connect(backend.socket_path, num_queues=4):
            pids = worker_pids(control)
            assert len(pids) == 4
            kill_backend(backend)  # SIGKILL: no clean-up at all
            assert all(wait_exit(pid, 10) for pid in pids.values()), "a worker outlived its back-end"
    finally:
        backend.stop()


@pytest.mark.parametrize("workers_kind", ["threads", "processes"])
def test_io_threads_serve_large_requests_and_flushes(backend_factory, image, workers_kind):
    backend = backend_factory("pyvhost", image, num_queues=2,
                              extra_args=("--queue-workers", workers_kind, "--io-threads", "3"))
    size = image.stat().st_size
    with BlkDriver.connect(backend.socket_path, num_queues=2, queue_size=256) as driver:
        expected = bytearray(image.read_bytes())
        requests = []
        for i in range(12):  # each in a 1 MiB slot of its own: queues complete in any order
            length = (1 << 20) if i % 2 else 4096
            offset = i * (1 << 20)
            payload = os.urandom(length)
            expected[offset : offset + length] = payload
            requests.append(BlkRequest.write(offset // SECTOR_SIZE, payload, queue=i % 2))
            if i % 4 == 3:
                requests.append(BlkRequest.flush(queue=i % 2))
        driver.run(requests, depth=8)
        assert hashlib.md5(driver.read_all()).hexdigest() == hashlib.md5(expected).hexdigest()
        assert image.read_bytes() == bytes(expected)
