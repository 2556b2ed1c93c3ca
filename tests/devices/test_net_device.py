"""virtio-net device logic without rings or sockets: header handling, the
control commands, the RX filter they set, SEND_RARP, queue groups."""

from __future__ import annotations

import struct

import pytest
from pyvhost_user.devices.base import DeviceError
from pyvhost_user.devices.net import NetDevice
from pyvhost_user.devices.net.config import NetConfig, parse_mac
from pyvhost_user.devices.net.constants import (
    CTRL_ERR,
    CTRL_OK,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    CtrlVlan,
    NetFeature,
    NetStatus,
)
from pyvhost_user.virtqueue.chain import DescriptorChain

VERSION_1 = 1 << 32
ALL_FEATURES = VERSION_1 | int(
    NetFeature.MAC | NetFeature.STATUS | NetFeature.CTRL_VQ | NetFeature.CTRL_RX
    | NetFeature.CTRL_RX_EXTRA | NetFeature.CTRL_VLAN | NetFeature.CTRL_MAC_ADDR
    | NetFeature.GUEST_ANNOUNCE | NetFeature.MQ
)
OWN = parse_mac("52:54:00:00:00:01")
OTHER = parse_mac("52:54:00:00:00:02")
PEER = parse_mac("52:54:00:00:00:99")
MULTI = parse_mac("01:00:5e:00:00:fb")
BCAST = b"\xff" * 6


class FakePort:
    name = "fake"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.deliver = None

    def start(self, deliver) -> None:
        self.deliver = deliver

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self) -> None:
        pass


@pytest.fixture
def port():
    return FakePort()


@pytest.fixture
def device(port):
    dev = NetDevice(port, mac=OWN, queue_pairs=2)
    dev.set_features(ALL_FEATURES)
    for q in range(dev.num_queues):
        dev.queue_ready(q, True)
    yield dev
    dev.close()


def frame(dst: bytes, src: bytes = PEER, payload: bytes = b"x" * 50, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return dst + src + tag + b"\x88\xb5" + payload


def chain(readable: bytes = b"", writable: int = 0) -> tuple[DescriptorChain, bytearray]:
    out = bytearray(b"\xee" * writable)
    c = DescriptorChain(0, readable=[memoryview(bytearray(readable))] if readable else [],
                        writable=[memoryview(out)] if writable else [],
                        readable_len=len(readable), writable_len=writable)
    return c, out


def ctrl(device: NetDevice, cls: int, cmd: int, data: bytes = b"") -> int:
    c, out = chain(bytes([cls, cmd]) + data, 1)
    assert device.process(device.control_queue, c) == 1
    return out[0]


def delivered(device: NetDevice, f: bytes) -> bool:
    """Deliver ``f``; True if it reached an RX queue (taken back out of it)."""
    before = device.metrics.snapshot()["rx_filtered"]
    device.deliver(f)
    if device.metrics.snapshot()["rx_filtered"] != before:
        return False
    for q in (0, 2):
        if device.has_work(q):
            c, _ = chain(writable=2048)
            assert device.process(q, c) > 0
            return True
    raise AssertionError("neither filtered nor queued")


# -- queues and config ----------------------------------------------------------------------

def test_queues_pairs_then_control_queue_in_its_own_group(device):
    assert device.num_queues == 5 and device.control_queue == 4
    assert device.num_groups == 2
    assert [device.queue_group(q) for q in range(5)] == [0, 0, 0, 0, 1]
    assert [device.work_fd(q) is not None for q in range(5)] == [True, False, True, False, False]


def test_config_space_has_mac_status_pairs_mtu_and_zeros_after(device):
    config = NetConfig.decode(device.read_config(0, 12))
    assert config == NetConfig(OWN, NetStatus.LINK_UP, 2, 1500)
    assert device.read_config(10, 8) == struct.pack("<H", 1500) + bytes(6)


def test_bad_configuration_is_refused(port):
    with pytest.raises(DeviceError):
        NetDevice(port, mac=MULTI)
    with pytest.raises(DeviceError):
        NetDevice(port, mac=OWN, mtu=20)
    with pytest.raises(DeviceError):
        NetDevice(port, mac=OWN, queue_pairs=0)


# -- TX and RX headers ----------------------------------------------------------------------

def test_tx_strips_the_12_byte_header(device, port):
    f = frame(PEER, OWN)
    c, _ = chain(bytes(12) + f)
    assert device.process(1, c) == 0
    assert port.sent == [f]


def test_tx_header_is_10_bytes_for_a_legacy_driver(device, port):
    device.set_features(0)
    f = frame(PEER, OWN)
    device.process(1, chain(bytes(10) + f)[0])
    assert port.sent == [f]


def test_tx_asking_for_an_offload_we_never_offered_is_dropped(device, port):
    header = bytes([1]) + bytes(11)  # VIRTIO_NET_HDR_F_NEEDS_CSUM
    device.process(1, chain(header + frame(PEER))[0])
    device.process(1, chain(bytes(12) + b"short")[0])
    assert port.sent == []
    m = device.metrics.snapshot()
    assert m["tx_dropped_offload"] == 1 and m["tx_dropped_malformed"] == 1


def test_rx_prepends_a_header_with_num_buffers_1(device):
    f = frame(OWN)
    device.deliver(f)
    assert device.has_work(0) and not device.has_work(2)
    c, out = chain(writable=2048)
    used = device.process(0, c)
    assert used == 12 + len(f)
    assert bytes(out[:12]) == bytes(10) + struct.pack("<H", 1)
    assert bytes(out[12:used]) == f
    assert not device.has_work(0)


def test_rx_frame_bigger_than_the_buffer_is_dropped_and_counted(device):
    device.deliver(frame(OWN, payload=b"y" * 1000))
    c, out = chain(writable=200)
    assert device.process(0, c) == 0
    assert device.metrics.snapshot()["rx_dropped_too_big"] == 1


def test_rx_backlog_is_bounded_and_drops_are_counted(port):
    dev = NetDevice(port, mac=OWN, backlog_frames=4)
    try:
        for _ in range(6):
            dev.deliver(frame(OWN))
        assert dev.metrics.snapshot()["rx_dropped_backlog_full"] == 2
    finally:
        dev.close()


def test_one_flow_always_lands_on_one_rx_queue_and_flows_spread(device):
    ctrl(device, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 2))
    queues = set()
    for i in range(32):
        src = bytes([0x52, 0, 0, 0, 1, i])
        picks = set()
        for _ in range(3):
            device.deliver(frame(OWN, src))
            picks |= {q for q in (0, 2) if device.has_work(q)}
            for q in picks:
                while device.has_work(q):
                    device.process(q, chain(writable=2048)[0])
        assert len(picks) == 1
        queues |= picks
    assert queues == {0, 2}


def test_frames_go_only_to_pairs_the_driver_enabled(device):
    # VQ_PAIRS_SET was never sent: one pair, so RX queue 0 only.
    for i in range(16):
        device.deliver(frame(OWN, bytes([0x52, 0, 0, 0, 2, i])))
    assert not device.has_work(2)


def test_without_ctrl_vq_the_enabled_rings_say_which_pairs_are_used(port):
    # QEMU and DPDK's virtio_user keep the control queue: CTRL_VQ is not acked to the
    # back-end, VQ_PAIRS_SET never reaches it, SET_VRING_ENABLE does (DPDK 22.11's
    # features with queues=2: VERSION_1, INDIRECT_DESC, CTRL_RX, CTRL_VLAN, MQ,
    # CTRL_MAC_ADDR).
    dev = NetDevice(port, mac=OWN, queue_pairs=2)
    try:
        dev.set_features(0x150CC0000)
        dev.queue_ready(0, True)
        queues = set()
        for i in range(32):
            dev.deliver(frame(OWN, bytes([0x52, 0, 0, 0, 3, i])))
            queues |= {q for q in (0, 2) if dev.has_work(q)}
        assert queues == {0}  # pair 1 not enabled yet
        dev.queue_ready(2, True)
        for q in (0, 2):
            while dev.has_work(q):
                dev.process(q, chain(writable=2048)[0])
        for i in range(32):
            dev.deliver(frame(OWN, bytes([0x52, 0, 0, 0, 3, i])))
        assert {q for q in (0, 2) if dev.has_work(q)} == {0, 2}
    finally:
        dev.close()


# -- control queue -------------------------------------------------------------------------

def test_rx_filter_starts_promiscuous(device):
    assert delivered(device, frame(OTHER))


def test_promisc_off_keeps_own_broadcast_and_drops_others(device):
    assert ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0") == CTRL_OK
    assert delivered(device, frame(OWN))
    assert delivered(device, frame(BCAST))
    assert not delivered(device, frame(OTHER))
    assert not delivered(device, frame(MULTI))


def test_allmulti_nomulti_nobcast_nouni_alluni(device):
    ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0")
    ctrl(device, CtrlClass.RX, CtrlRx.ALLMULTI, b"\1")
    assert delivered(device, frame(MULTI))
    ctrl(device, CtrlClass.RX, CtrlRx.NOMULTI, b"\1")
    assert not delivered(device, frame(MULTI))
    ctrl(device, CtrlClass.RX, CtrlRx.NOBCAST, b"\1")
    assert not delivered(device, frame(BCAST))
    ctrl(device, CtrlClass.RX, CtrlRx.ALLUNI, b"\1")
    assert delivered(device, frame(OTHER))
    ctrl(device, CtrlClass.RX, CtrlRx.NOUNI, b"\1")
    assert not delivered(device, frame(OWN))


def test_mac_table_set_lets_listed_addresses_in(device):
    ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0")
    table = struct.pack("<I", 1) + OTHER + struct.pack("<I", 1) + MULTI
    assert ctrl(device, CtrlClass.MAC, CtrlMac.TABLE_SET, table) == CTRL_OK
    assert delivered(device, frame(OTHER))
    assert delivered(device, frame(MULTI))
    assert not delivered(device, frame(parse_mac("01:00:5e:00:00:01")))


def test_mac_table_with_a_wrong_count_is_refused_and_changes_nothing(device):
    ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0")
    bad = struct.pack("<I", 3) + OTHER + struct.pack("<I", 0)
    assert ctrl(device, CtrlClass.MAC, CtrlMac.TABLE_SET, bad) == CTRL_ERR
    assert not delivered(device, frame(OTHER))


def test_mac_addr_set_changes_the_config_and_the_filter(device):
    ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0")
    assert ctrl(device, CtrlClass.MAC, CtrlMac.ADDR_SET, OTHER) == CTRL_OK
    assert device.read_config(0, 6) == OTHER
    assert delivered(device, frame(OTHER))
    assert not delivered(device, frame(OWN))
    assert ctrl(device, CtrlClass.MAC, CtrlMac.ADDR_SET, MULTI) == CTRL_ERR
    device.reset()
    assert device.read_config(0, 6) == OWN


def test_vlan_filter_needs_the_vid_in_the_table(device):
    ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0")
    assert not delivered(device, frame(OWN, vlan=100))
    assert delivered(device, frame(OWN))  # untagged frames are not filtered
    assert ctrl(device, CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 100)) == CTRL_OK
    assert delivered(device, frame(OWN, vlan=100))
    assert not delivered(device, frame(OWN, vlan=101))
    ctrl(device, CtrlClass.VLAN, CtrlVlan.DEL, struct.pack("<H", 100))
    assert not delivered(device, frame(OWN, vlan=100))
    assert ctrl(device, CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 4096)) == CTRL_ERR


def test_mq_pairs_out_of_range_are_refused(device):
    assert ctrl(device, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 3)) == CTRL_ERR
    assert ctrl(device, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 0)) == CTRL_ERR
    assert ctrl(device, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 2)) == CTRL_OK
    assert device.active_pairs == 2


def test_announce_ack_clears_the_announce_status_bit(device):
    device.request_announce()
    assert NetConfig.decode(device.read_config(0, 12)).status & NetStatus.ANNOUNCE
    assert ctrl(device, CtrlClass.ANNOUNCE, 0) == CTRL_OK
    assert NetConfig.decode(device.read_config(0, 12)).status == NetStatus.LINK_UP


def test_commands_of_features_not_negotiated_are_refused(device):
    device.set_features(VERSION_1 | int(NetFeature.CTRL_VQ | NetFeature.CTRL_RX))
    assert ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0") == CTRL_OK
    assert ctrl(device, CtrlClass.RX, CtrlRx.NOBCAST, b"\1") == CTRL_ERR  # CTRL_RX_EXTRA
    assert ctrl(device, CtrlClass.VLAN, CtrlVlan.ADD, b"\1\0") == CTRL_ERR
    assert ctrl(device, CtrlClass.MAC, CtrlMac.ADDR_SET, OTHER) == CTRL_ERR
    assert ctrl(device, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, b"\1\0") == CTRL_ERR
    assert ctrl(device, 99, 0) == CTRL_ERR
    assert device.metrics.snapshot()["ctrl_refused"] == 5


def test_malformed_commands_get_err_and_no_ack_byte_means_no_answer(device):
    assert ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"") == CTRL_ERR
    c, _ = chain(bytes([0]))
    assert device.process(device.control_queue, c) == 0
    only_ack, out = chain(writable=1)
    assert device.process(device.control_queue, only_ack) == 1 and out[0] == CTRL_ERR


def test_reset_forgets_what_the_driver_set(device):
    ctrl(device, CtrlClass.RX, CtrlRx.PROMISC, b"\0")
    ctrl(device, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 2))
    device.deliver(frame(OWN))
    device.reset()
    assert device.active_pairs == 1 and device.filter.promisc
    assert not device.has_work(0)


def test_send_rarp_broadcasts_a_reverse_request_from_the_mac(device, port):
    device.send_rarp(OTHER)
    (f,) = port.sent
    assert len(f) == 60
    assert f[:6] == BCAST and f[6:12] == OTHER and f[12:14] == b"\x80\x35"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 3)
    assert f[22:28] == OTHER and f[32:38] == OTHER
