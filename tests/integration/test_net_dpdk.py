"""DPDK 22.11's testpmd as a real vhost-user front-end of our vhost-user-net back-end.

    testpmd (net_virtio_user) -- back-end A --+-- switch --+-- back-end B -- reference front-end

testpmd drives back-end A through ``net_virtio_user`` (its memory: EAL's
memfd with ``--no-huge``); our reference front-end (frontend/net.py) drives
back-end B on another port of the built-in switch. Frames are checked both
ways: what testpmd builds (txonly's UDP template, sent with ``start
tx_first``) at our front-end, header byte for byte; what our front-end sends
at testpmd's counters (rxonly) and back from its macswap engine byte for
byte. With 1 queue pair and with 2 (virtio_user negotiates MQ with us when
``queues=2``: it then emulates the control queue and turns VQ_PAIRS_SET
into SET_VRING_ENABLE).

Waiting is on something that answers: testpmd's prompt after a command
(``start tx_first N`` returns once the bursts are on its TX ring), the
reference front-end's call eventfds, testpmd's counters asked again.
"""

from __future__ import annotations

import re
import struct

import pytest
from pyvhost_user.devices.net.config import parse_mac
from pyvhost_user.frontend.net import NetDriver
from pyvhost_user.launch import dpdk
from pyvhost_user.launch.net import start_net_backend, start_switch
from pyvhost_user.wire import VirtioFeature as VF

TESTPMD_MAC = "52:54:00:00:30:01"
BACKEND_A_MAC = "52:54:00:00:30:0a"   # config space of testpmd's back-end; virtio_user uses mac=
OUR_MAC = "52:54:00:00:30:0b"
ETHERTYPE = b"\x88\xb5"
BURST = 32                            # testpmd's default burst
WINDOW_BURSTS = 2                     # bursts per stream per ``start tx_first``
SIZES = [60, 64, 128, 577, 1000, 1514]


def require_testpmd() -> None:
    try:
        dpdk.find_testpmd()
    except dpdk.TestpmdNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


def acked_features(log: str) -> int:
    """The last ``features acked`` the back-end logged (its SET_FEATURES)."""
    found = re.findall(r"features acked: (0x[0-9a-f]+)", log)
    assert found, "the back-end logged no SET_FEATURES:\n" + log[-2000:]
    return int(found[-1], 16)


@pytest.fixture(params=[(1, False), (2, False), (1, True), (2, True)],
                ids=["1pair", "2pairs", "1pair-packed", "2pairs-packed"])
def dpdk_net(request, sock_dir):
    """(testpmd, our driver, queue pairs): testpmd on back-end A, our front-end on B.
    The packed cases give testpmd ``packed_vq=1`` and our front-end split rings:
    the switch joins a packed device and a split one."""
    require_testpmd()
    pairs, packed = request.param
    procs = [start_switch(sock_dir / "sw.sock")]
    driver = testpmd = None
    try:
        procs.append(start_net_backend(sock_dir / "a.sock", switch=procs[0].socket_path,
                                       mac=BACKEND_A_MAC, queue_pairs=pairs, log_level="info"))
        procs.append(start_net_backend(sock_dir / "b.sock", switch=procs[0].socket_path,
                                       mac=OUR_MAC, log_level="info"))
        driver = NetDriver.connect(procs[2].socket_path)
        testpmd = dpdk.start_testpmd(procs[1].socket_path, mac=TESTPMD_MAC, peer_mac=OUR_MAC,
                                     queue_pairs=pairs, packed_vq=packed,
                                     log_path=sock_dir / "testpmd.log")
        # What ran: RING_PACKED acked as asked, and every data ring in that layout.
        log = procs[1].log()
        assert bool(acked_features(log) & VF.RING_PACKED) == packed
        started = dict(re.findall(r"ring (\d+) started: (packed|size)", log))
        assert started == {str(q): "packed" if packed else "size" for q in range(2 * pairs)}, log
        assert not driver.packed
        yield testpmd, driver, pairs
    finally:
        if testpmd is not None:
            testpmd.quit()
        if driver is not None:
            driver.close()
        for proc in reversed(procs):
            proc.stop()


def ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def txonly_headers(dst: bytes, src: bytes, size: int) -> bytes:
    """The 42 header bytes of testpmd's txonly packet (app/test-pmd/txonly.c): UDP
    9 -> 9 from 198.18.0.1 to 198.18.0.2, TTL 64, no UDP checksum. The payload
    after them is never written by testpmd (whatever the mbuf held)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0,
                     bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    ip = ip[:10] + struct.pack("!H", ipv4_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", 9, 9, size - 34, 0)
    return dst + src + b"\x08\x00" + ip + udp


def make_frame(dst: bytes, src: bytes, seq: int, size: int) -> bytes:
    """Bytes 26..33 (where IPv4 addresses would be) differ per frame: flows spread."""
    head = dst + src + ETHERTYPE + struct.pack("!I", seq)
    body = (seq.to_bytes(4, "big") * (size // 4 + 1))[: max(0, size - len(head))]
    return head + body


@pytest.mark.parametrize("size", [64, 1500])
def test_testpmd_frames_reach_our_front_end(dpdk_net, size):
    testpmd, ours, pairs = dpdk_net
    testpmd.set_forward_mode("io")      # tx_first bursts, then io: nothing comes back
    testpmd.command(f"set txpkts {size}")
    per_window = WINDOW_BURSTS * BURST * pairs   # one stream per queue pair
    expected_head = txonly_headers(parse_mac(OUR_MAC), parse_mac(TESTPMD_MAC), size)
    received = 0
    for _ in range(8):
        testpmd.start(tx_first=WINDOW_BURSTS)
        got = ours.receive_frames(per_window, timeout=30)
        fwd = testpmd.stop()
        assert (fwd.tx_packets, fwd.tx_dropped) == (per_window, 0)
        assert len(got) == per_window
        for frame in got:
            assert len(frame) == size
            assert frame[:42] == expected_head
        received += len(got)
    assert ours.poll_received() == []
    stats = testpmd.port_stats()
    assert stats.tx_packets == received == 8 * per_window
    assert stats.tx_bytes == received * size
    if pairs == 2:
        xstats = testpmd.xstats()
        assert xstats["tx_q0_good_packets"] == xstats["tx_q1_good_packets"] == received // 2


def test_our_frames_are_counted_by_testpmd_rxonly(dpdk_net):
    testpmd, ours, pairs = dpdk_net
    testpmd.set_forward_mode("rxonly")
    testpmd.start()
    dst, src = parse_mac(TESTPMD_MAC), parse_mac(OUR_MAC)
    frames = [make_frame(dst, src, i, SIZES[i % len(SIZES)]) for i in range(1200)]
    for start in range(0, len(frames), 64):
        # a window at a time: a starved forwarding core must not overflow A's backlog
        ours.send(frames[start : start + 64])
        stats = testpmd.wait_rx_packets(min(len(frames), start + 64))
    fwd = testpmd.stop()
    assert stats.rx_packets == len(frames) and fwd.rx_packets == len(frames)
    assert stats.rx_bytes == sum(len(f) for f in frames)
    assert (stats.rx_errors, stats.rx_missed, stats.rx_nombuf) == (0, 0, 0)
    if pairs == 2:
        xstats = testpmd.xstats()
        per_queue = [xstats["rx_q0_good_packets"], xstats["rx_q1_good_packets"]]
        assert sum(per_queue) == len(frames) and min(per_queue) > 0, per_queue


def test_our_frames_come_back_from_testpmd_macswap_byte_for_byte(dpdk_net):
    testpmd, ours, pairs = dpdk_net
    testpmd.set_forward_mode("macswap")
    testpmd.start()
    dst, src = parse_mac(TESTPMD_MAC), parse_mac(OUR_MAC)
    frames = [make_frame(dst, src, i, SIZES[i % len(SIZES)]) for i in range(1200)]
    got: list[bytes] = []
    for start in range(0, len(frames), 64):
        batch = frames[start : start + 64]
        ours.send(batch)
        got += ours.receive_frames(len(batch), timeout=30)
    fwd = testpmd.stop()
    expected = [f[6:12] + f[0:6] + f[12:] for f in frames]
    if pairs == 1:
        assert got == expected          # one RX queue, one TX queue: in order
    else:
        assert sorted(got) == sorted(expected)  # two queues: order only within one
    assert (fwd.rx_packets, fwd.tx_packets, fwd.rx_dropped, fwd.tx_dropped) == (
        len(frames), len(frames), 0, 0)
    if pairs == 2:
        xstats = testpmd.xstats()
        assert min(xstats["rx_q0_good_packets"], xstats["rx_q1_good_packets"]) > 0
