"""vhost-user-net back-ends as real processes, driven by the reference front-end.

Two back-ends on the built-in switch exchange frames both ways; control
commands change what is delivered; SEND_RARP and NET_SET_MTU; a tap in a
test network namespace. "Not delivered" is shown without waiting: a frame
that must pass is sent after the one that must not, on the same path, so it
arriving first proves the other was dropped (one flow keeps its order
through the switch socket, the device backlog and one RX queue).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import re

import pytest
from pyvhost_user.devices.net.config import parse_mac
from pyvhost_user.devices.net.constants import CtrlRx
from pyvhost_user.frontend.net import NetDriver
from pyvhost_user.frontend.packed_ring import PackedRing
from pyvhost_user.frontend.split_ring import SplitRing
from pyvhost_user.launch.net import start_net_backend, start_switch
from pyvhost_user.launch.netns import TapHost
from pyvhost_user.wire import VirtioFeature as VF

MAC_A = "52:54:00:00:10:0a"
MAC_B = "52:54:00:00:10:0b"
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental


@pytest.fixture
def net_pair(sock_dir):
    """(switch, backend A, backend B, driver A, driver B); all stopped at the end."""
    procs = [start_switch(sock_dir / "sw.sock")]
    drivers = []
    try:
        for name, mac in (("a", MAC_A), ("b", MAC_B)):
            procs.append(start_net_backend(sock_dir / f"{name}.sock", switch=procs[0].socket_path,
                                           mac=mac, log_level="info"))
        for proc in procs[1:]:
            drivers.append(NetDriver.connect(proc.socket_path))
        yield (*procs, *drivers)
    finally:
        for driver in drivers:
            driver.close()
        for proc in reversed(procs):
            proc.stop()


def acked_features(log: str) -> int:
    """The last ``features acked`` the back-end logged (its SET_FEATURES)."""
    found = re.findall(r"features acked: (0x[0-9a-f]+)", log)
    assert found, "the back-end logged no SET_FEATURES:\n" + log[-2000:]
    return int(found[-1], 16)


def ring_starts(log: str) -> dict[int, str]:
    """ring -> "packed" or "split", as the back-end last started it."""
    return {int(n): ("packed" if packed else "split")
            for n, packed in re.findall(r"ring (\d+) started: (packed)?", log)}


def exchange_both_ways(a: NetDriver, b: NetDriver, count: int = 1500) -> None:
    """``count`` frames of mixed sizes A -> B, then B -> A, byte for byte and in order."""
    mac_a, mac_b = a.config.mac, b.config.mac
    sizes = [60, 64, 128, 577, 1000, 1514]
    for sender, receiver, dst, src in ((a, b, mac_b, mac_a), (b, a, mac_a, mac_b)):
        expected = [make_frame(dst, src, i, sizes[i % len(sizes)]) for i in range(count)]
        got: list[bytes] = []
        window = 64  # within the RX ring, so the receiver's ring never runs dry
        for start in range(0, len(expected), window):
            batch = expected[start : start + window]
            sender.send(batch)
            got += receiver.receive_frames(len(batch), timeout=20)
        assert len(got) == len(expected)
        assert got == expected  # byte for byte, in order


def make_frame(dst: bytes, src: bytes, seq: int, size: int) -> bytes:
    head = dst + src + ETHERTYPE + struct.pack("!I", seq)
    body = (seq.to_bytes(4, "big") * (size // 4 + 1))[: max(0, size - len(head))]
    return head + body


def test_two_front_ends_exchange_frames_both_ways_through_the_switch(net_pair):
    _, _, _, a, b = net_pair
    mac_a, mac_b = a.config.mac, b.config.mac
    assert (mac_a, mac_b) == (parse_mac(MAC_A), parse_mac(MAC_B))
    sizes = [60, 64, 128, 577, 1000, 1514]
    for sender, receiver, dst, src in ((a, b, mac_b, mac_a), (b, a, mac_a, mac_b)):
        expected = [make_frame(dst, src, i, sizes[i % len(sizes)]) for i in range(1500)]
        got: list[bytes] = []
        window = 64  # within the RX ring, so the receiver's ring never runs dry
        for start in range(0, len(expected), window):
            batch = expected[start : start + window]
            sender.send(batch)
            got += receiver.receive_frames(len(batch), timeout=20)
        assert len(got) == len(expected)
        assert got == expected  # byte for byte, in order


def test_control_commands_change_what_is_delivered(net_pair):
    _, _, _, a, b = net_pair
    mac_a, mac_b = a.config.mac, b.config.mac
    other = parse_mac("52:54:00:00:10:99")
    multicast = parse_mac("01:00:5e:00:00:fb")
    seq = iter(range(1, 10_000))
    b_address = [mac_b]  # where the marker goes: B's address, which MAC_ADDR_SET changes

    def exchange(*dsts: bytes, vlan: int | None = None) -> list[bytes]:
        """Send a frame to each of ``dsts`` then a marker to B; what B got before it."""
        frames = []
        for dst in dsts:
            f = make_frame(dst, mac_a, next(seq), 80)
            if vlan is not None:
                f = f[:12] + struct.pack("!HH", 0x8100, vlan) + f[12:]
            frames.append(f)
        marker = make_frame(b_address[0], mac_a, 0, 64)
        a.send([*frames, marker])
        got = []
        while not got or got[-1] != marker:
            got += b.receive_frames(1, timeout=10)
        return [f[:6] for f in got[:-1]]

    # promiscuous from reset: everything, also what is not for B
    assert exchange(mac_b, other, multicast) == [mac_b, other, multicast]
    b.set_rx_mode(CtrlRx.PROMISC, False)
    assert exchange(mac_b, other, multicast) == [mac_b]
    b.set_rx_mode(CtrlRx.ALLMULTI, True)
    assert exchange(other, multicast) == [multicast]
    b.set_mac_tables([other], [])
    assert exchange(other) == [other]
    b.set_rx_mode(CtrlRx.NOBCAST, True)
    assert exchange(b"\xff" * 6, mac_b) == [mac_b]
    # VLAN: tagged frames need their id added
    assert exchange(mac_b, vlan=7) == []
    b.vlan(7)
    assert exchange(mac_b, vlan=7) == [mac_b]
    # MAC_ADDR_SET: the new address is B's, the config space shows it
    new_mac = parse_mac("52:54:00:00:10:bb")
    b.set_mac(new_mac)
    assert b.read_config().mac == new_mac
    b_address[0] = new_mac
    assert exchange(new_mac, mac_b) == [new_mac]


def test_send_rarp_is_broadcast_to_the_other_ports(net_pair):
    _, _, _, a, b = net_pair
    migrated = parse_mac("52:54:00:00:10:77")
    a.frontend.send_rarp(migrated)
    (frame,) = b.receive_frames(1, timeout=10)
    assert frame[:12] == b"\xff" * 6 + migrated and frame[12:14] == b"\x80\x35"
    assert frame[22:28] == migrated and len(frame) == 60


def test_net_set_mtu_shows_in_the_config_space(net_pair):
    _, _, _, a, _ = net_pair
    a.frontend.net_set_mtu(9000)
    assert a.read_config().mtu == 9000


def test_control_queue_is_its_own_group_for_the_extension(sock_dir):
    switch = start_switch(sock_dir / "sw.sock")
    backend = start_net_backend(sock_dir / "g.sock", switch=switch.socket_path, queue_pairs=2,
                                log_level="info")
    try:
        with NetDriver.connect(backend.socket_path, queue_pairs=2, extension=True) as driver:
            groups = [driver.frontend.get_vring_group(q) for q in range(5)]
            assert groups == [0, 0, 0, 0, 1]
            driver.set_queue_pairs(2)
    finally:
        backend.stop()
        switch.stop()


RAW_PEER = textwrap.dedent("""
    import socket, sys
    iface, count = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    s.bind((iface, 0))
    print("ready", flush=True)
    for line in sys.stdin:          # one hex frame per line: send it
        if line.strip() == "recv":
            break
        s.send(bytes.fromhex(line.strip()))
        print("sent", flush=True)
    for _ in range(count):          # then receive and print ``count`` frames
        print(s.recv(65536).hex(), flush=True)
""")


def test_frames_both_ways_with_a_tap_in_a_test_namespace(sock_dir):
    host = TapHost.create("10.78.1.1/24")
    backend = peer = driver = None
    try:
        backend = start_net_backend(sock_dir / "tap.sock", tap=host.interface, mac=MAC_A,
                                    command_prefix=host.prefix, log_level="info")
        driver = NetDriver.connect(backend.socket_path)
        peer = subprocess.Popen([*host.prefix, sys.executable, "-c", RAW_PEER, host.interface, "20"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert peer.stdout.readline().strip() == "ready"
        tap_mac = parse_mac("02:00:00:00:00:02")  # a raw socket sends any source
        mac_a = parse_mac(MAC_A)
        inbound = [make_frame(mac_a, tap_mac, i, 100 + i) for i in range(20)]
        for f in inbound:
            peer.stdin.write(f.hex() + "\n")
            peer.stdin.flush()
            assert peer.stdout.readline().strip() == "sent"
        ours: list[bytes] = []
        while len(ours) < len(inbound):  # the namespace's kernel sends IPv6 ND frames too
            ours += [g for g in driver.receive_frames(1, timeout=10) if g[12:14] == ETHERTYPE]
        assert ours == inbound
        peer.stdin.write("recv\n")
        peer.stdin.flush()
        outbound = [make_frame(b"\xff" * 6, mac_a, 1000 + i, 200 + i) for i in range(20)]
        driver.send(outbound)
        received = [bytes.fromhex(peer.stdout.readline().strip()) for _ in range(20)]
        assert received == outbound
        assert peer.wait(10) == 0
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait()
        if driver is not None:
            driver.close()
        if backend is not None:
            backend.stop()
        host.remove()


# ---- packed rings and a front-end IOMMU (ACCESS_PLATFORM) --------------------------

@pytest.mark.parametrize(
    ("a_options", "b_options"),
    [
        ({"packed": True}, {}),
        ({"packed": True, "queue_size": 37}, {"packed": True, "queue_size": 100}),
        ({"iommu": "shuffle"}, {}),
        ({"iommu": "offset", "packed": True}, {"iommu": "shuffle", "queue_size": 64}),
    ],
    ids=["packed-split", "packed-packed-odd-sizes", "iommu-split", "iommu-packed-iommu-split"],
)
def test_frames_both_ways_packed_and_iommu(sock_dir, a_options, b_options):
    """A and B each as asked (packed or split rings, with or without an IOMMU):
    frames both ways, byte for byte; the back-end logs say what ran. Odd ring
    sizes make the packed rings wrap at odd places (1500 frames: dozens of laps)."""
    procs = [start_switch(sock_dir / "sw.sock")]
    drivers: list[NetDriver] = []
    try:
        for name, mac in (("a", MAC_A), ("b", MAC_B)):
            procs.append(start_net_backend(sock_dir / f"{name}.sock", switch=procs[0].socket_path,
                                           mac=mac, log_level="info"))
        for proc, options in zip(procs[1:], (a_options, b_options)):
            drivers.append(NetDriver.connect(proc.socket_path, **options))
        for driver, options in zip(drivers, (a_options, b_options)):
            packed, iommu = options.get("packed", False), "iommu" in options
            assert driver.packed == packed and driver.access_platform == iommu
            layout = PackedRing if packed else SplitRing
            assert all(isinstance(driver.ring(q), layout) for q in range(3))
        exchange_both_ways(*drivers)
        for driver, options in zip(drivers, (a_options, b_options)):
            driver.set_rx_mode(CtrlRx.PROMISC, True)  # the control queue, same layout
            if "iommu" in options:
                fe = driver.frontend
                assert fe.iotlb_counters["miss_received"] > 0
                assert all(answered for _, _, answered in fe.responder.misses)
    finally:
        for driver in drivers:
            driver.close()
        for proc in reversed(procs):
            proc.stop()
    for proc, options in zip(procs[1:], (a_options, b_options)):
        log = proc.log()
        packed, iommu = options.get("packed", False), "iommu" in options
        features = acked_features(log)
        assert bool(features & VF.RING_PACKED) == packed, hex(features)
        assert bool(features & VF.ACCESS_PLATFORM) == iommu, hex(features)
        # every ring (RX, TX, control) ran in the negotiated layout
        assert ring_starts(log) == {q: "packed" if packed else "split" for q in range(3)}, log
        counters = _counters(log)
        assert counters["tx_frames"] == counters["rx_frames"] == 1500, counters
        assert counters["chains_access_denied"] == counters["ctrl_refused"] == 0, counters
        assert counters["ctrl_commands"] == 1, counters


def _counters(log: str) -> dict[str, int]:
    """What the back-end logged at exit (``net counters: {...}``)."""
    m = re.search(r"net counters: (\{.*\})", log)
    assert m, "the back-end logged no counters at exit:\n" + log[-2000:]
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", m.group(1))}


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10.0"])
@pytest.mark.parametrize("options", [{"packed": True}, {"packed": True, "iommu": "offset"}],
                         ids=["packed", "packed-iommu"])
def test_reboots_restart_packed_rings_where_they_stopped(sock_dir, profile, options):
    """A guest reboot as QEMU drives it: GET_VRING_BASE answers the packed
    positions (both halves, used = avail: nothing left in flight), the rings
    start again fresh, frames flow both ways after each reboot."""
    procs = [start_switch(sock_dir / "sw.sock")]
    drivers: list[NetDriver] = []
    try:
        for name, mac in (("a", MAC_A), ("b", MAC_B)):
            procs.append(start_net_backend(sock_dir / f"{name}.sock", switch=procs[0].socket_path,
                                           mac=mac, log_level="debug"))
        a = NetDriver.connect(procs[1].socket_path, profile=profile, queue_size=64, **options)
        drivers.append(a)
        b = NetDriver.connect(procs[2].socket_path, profile=profile)
        drivers.append(b)
        for round_ in range(3):
            exchange_both_ways(a, b, count=200)   # 200 frames: the 64-entry rings wrap
            a.flush_tx()
            a.reboot()
            assert a.packed and all(isinstance(a.ring(q), PackedRing) for q in range(3))
            marker = make_frame(a.config.mac, b.config.mac, 7777 + round_, 64)
            b.send([marker])
            assert a.receive_frames(1, timeout=10) == [marker]
    finally:
        for driver in drivers:
            driver.close()
        for proc in reversed(procs):
            proc.stop()
    log = procs[1].log()
    bases = [int(v, 16) for v in re.findall(r"-> GET_VRING_BASE reply index=\d+ num=(0x[0-9a-f]+)", log)]
    assert len(bases) == 3 * 3, bases
    for base in bases:  # used half == avail half: nothing in flight at the stop
        assert base >> 16 == base & 0xFFFF, hex(base)
    assert len(re.findall(r"ring 0 started: packed", log)) == 4
