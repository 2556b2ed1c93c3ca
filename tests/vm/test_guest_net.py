"""Real guests on vhost-user-net: two QEMU guests ping each other through the
switch; a guest pings a tap address in a test network namespace.

Each guest's /init (guest-images/init.sh) configures eth0, pings its peer
until it answers ("ping" step), then stays up answering pings until the host
writes a line on its console ("release" step): the host lets both guests go
only once both have succeeded, so neither powers off under the other.
"""

from __future__ import annotations

import re

import pytest
from pyvhost_user.launch.net import VhostUserNet, start_net_backend, start_switch
from pyvhost_user.launch.netns import TapHost

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 180.0
ACCESS_PLATFORM = 1 << 33
RING_PACKED = 1 << 34


def _nic(version: str, socket, mac: str, queue_pairs: int = 1, *, packed: bool = False,
         iommu: bool = False) -> VhostUserNet:
    # QEMU 7.2 can crash on vhost-user-net with MSI-X under TCG (shared docs): no vectors.
    return VhostUserNet(socket, mac, queue_pairs=queue_pairs, packed=packed, iommu=iommu,
                        options={"vectors": 0} if version == "7.2" else {})


def _counters(log: str) -> dict[str, int]:
    m = re.search(r"net counters: (\{.*\})", log)
    assert m, "the back-end logged no counters at exit:\n" + log[-2000:]
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", m.group(1))}


def _check_negotiated(log: str, queue_pairs: int, *, packed: bool, iommu: bool) -> None:
    """From the back-end's log: what the guest's driver acked (its last
    SET_FEATURES), how each data ring last started, and IOTLB traffic."""
    acked = [int(v, 16) for v in re.findall(r"features acked: (0x[0-9a-f]+)", log)]
    assert acked, "no SET_FEATURES in the back-end's log:\n" + log[-2000:]
    assert bool(acked[-1] & RING_PACKED) == packed, hex(acked[-1])
    assert bool(acked[-1] & ACCESS_PLATFORM) == iommu, hex(acked[-1])
    started = dict(re.findall(r"ring (\d+) started: (packed|size)", log))
    assert started == {str(q): "packed" if packed else "size" for q in range(2 * queue_pairs)}, (
        started)
    updates = len(re.findall(r"<- IOTLB_MSG .*type=UPDATE", log))
    assert (updates > 0) == iommu, f"{updates} IOTLB updates"


@pytest.fixture
def net_processes(tmp_path):
    """Keeps the switch and back-ends started; stops them at the end and copies
    their logs next to the machines' (sock_dir goes away with the test)."""
    started = []

    def keep(proc):
        started.append(proc)
        return proc

    yield keep
    for proc in reversed(started):
        proc.stop()
        (tmp_path / proc.log_path.name).write_text(proc.log())


# Guest settings: (packed, vIOMMU). Each case is two TCG boots (~10 s each), so
# the axes are covered, not multiplied out: each QEMU version runs packed and
# split rings (in the same pair: a packed guest pings a split one), with 1 and 2
# queue pairs, and one guest behind intel-iommu (device-iotlb, ATS); the vIOMMU
# guest is split on 7.2 and packed on 10.0, with 2 pairs on 7.2 and 1 on 10.0.
SPLIT, PACKED = (False, False), (True, False)
SPLIT_VIOMMU, PACKED_VIOMMU = (False, True), (True, True)
PING_CASES = [
    pytest.param("7.2", 1, (PACKED, SPLIT), id="7.2-1pair-packed-split"),
    pytest.param("7.2", 2, (SPLIT_VIOMMU, PACKED), id="7.2-2pairs-split+viommu-packed"),
    pytest.param("10.0", 1, (SPLIT, PACKED_VIOMMU), id="10.0-1pair-split-packed+viommu"),
    pytest.param("10.0", 2, (PACKED, SPLIT), id="10.0-2pairs-packed-split"),
]


@pytest.mark.parametrize(("version", "queue_pairs", "settings"), PING_CASES)
def test_two_guests_ping_each_other_through_the_switch(version, queue_pairs, settings,
                                                       machine_factory, sock_dir, net_processes):
    """With 2 queue pairs QEMU 7.2 sends the memory region once per pair (one
    vhost_dev each): a back-end refusing the second failed the device start."""
    switch = net_processes(start_switch(sock_dir / "sw.sock"))
    guests = [("52:54:00:00:01:01", "10.79.0.1", "10.79.0.2"),
              ("52:54:00:00:01:02", "10.79.0.2", "10.79.0.1")]
    backends, machines = [], []
    for i, ((mac, ip, peer), (packed, iommu)) in enumerate(zip(guests, settings)):
        backend = net_processes(start_net_backend(sock_dir / f"n{i}.sock", switch=switch.socket_path,
                                                  queue_pairs=queue_pairs))
        backends.append(backend)
        nic = _nic(version, backend.socket_path, mac, queue_pairs, packed=packed, iommu=iommu)
        machines.append(machine_factory(
            version, steps=("ping", "release"), serial_input=True, name=f"vm{i}", viommu=iommu,
            guest_args={"pvu_net_ip": f"{ip}/24", "pvu_net_peer": peer},
            extra_args=nic.args(0)))
    for m in machines:
        m.wait_for(lambda text: "release=waiting" in text or "ping=failed" in text,
                   timeout=BOOT_TIMEOUT)
    for m in machines:
        m.send_serial("go\n")
    results = [m.wait_for_done(timeout=60)[-1] for m in machines]
    for (mac, _, _), r in zip(guests, results):
        assert r["ping"] == "ok", r
        assert r["ping_replies"] == "3", r
        assert r["net_mac"] == mac
        assert not r.errors
    for m in machines:
        m.wait_exit(30)
    for b, (packed, iommu) in zip(backends, settings):
        b.stop()
        log = b.log()
        counters = _counters(log)
        # ARP both ways and at least 4 echo requests and 4 replies went through each.
        assert counters["tx_frames"] >= 5 and counters["rx_frames"] >= 5, counters
        assert counters["tx_dropped_malformed"] == counters["tx_dropped_offload"] == 0
        assert counters["chains_access_denied"] == 0, counters
        _check_negotiated(log, queue_pairs, packed=packed, iommu=iommu)


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_guest_pings_a_tap_in_a_test_namespace(version, machine_factory, sock_dir, net_processes):
    host = TapHost.create("10.78.0.1/24")
    try:
        backend = net_processes(start_net_backend(
            sock_dir / "tap.sock", tap=host.interface, command_prefix=host.prefix))
        m = machine_factory(version, steps=("ping", "release"), serial_input=True,
                            guest_args={"pvu_net_ip": "10.78.0.2/24", "pvu_net_peer": host.ip},
                            extra_args=_nic(version, backend.socket_path, "52:54:00:00:02:01").args(0))
        m.wait_for(lambda text: "release=waiting" in text or "ping=failed" in text,
                   timeout=BOOT_TIMEOUT)
        m.send_serial("go\n")
        r = m.wait_for_done(timeout=60)[-1]
        assert r["ping"] == "ok" and r["ping_replies"] == "3", r
        m.wait_exit(30)
        backend.stop()
        counters = _counters(backend.log())
        assert counters["rx_frames"] >= 4 and counters["tx_frames"] >= 4, counters
        _check_negotiated(backend.log(), 1, packed=False, iommu=False)
    finally:
        host.remove()
