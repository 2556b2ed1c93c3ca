"""The testpmd launcher without testpmd: argv, the refusal when it is missing,
and the parsers of its output (samples printed by DPDK 22.11's testpmd)."""

from __future__ import annotations

import pytest
from pyvhost_user.launch import dpdk

PORT_STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 1200       RX-missed: 0          RX-bytes:  674400
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 32         TX-errors: 0          TX-bytes:  2048

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

STOP = """Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 7              RX-dropped: 1             RX-total: 8
  TX-packets: 64             TX-dropped: 2             TX-total: 66
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 7              RX-dropped: 1             RX-total: 8
  TX-packets: 64             TX-dropped: 2             TX-total: 66
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""


def test_missing_testpmd_is_refused_with_the_setup_script_named(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(dpdk.TestpmdNotFound, match="scripts/setup.sh"):
        dpdk.find_testpmd()
    with pytest.raises(dpdk.TestpmdNotFound):
        dpdk.start_testpmd("/nonexistent.sock", mac="52:54:00:00:00:01", log_path="/dev/null")


def test_argv_is_interactive_without_hugepages_and_with_the_vdev():
    argv = dpdk.testpmd_argv("/run/x.sock", mac="52:54:00:00:00:01", queue_pairs=2,
                             peer_mac="52:54:00:00:00:02", file_prefix="p")
    assert argv[:3] == ["stdbuf", "-o0", "dpdk-testpmd"]
    eal, app = argv[3 : argv.index("--")], argv[argv.index("--") + 1 :]
    assert "--no-huge" in eal and "--no-shconf" in eal and "--in-memory" not in eal
    vdev = eal[eal.index("--vdev") + 1]
    assert vdev == "net_virtio_user0,path=/run/x.sock,queues=2,queue_size=256,mac=52:54:00:00:00:01"
    assert "-i" in app and "--rxq=2" in app and "--txq=2" in app
    assert "--eth-peer=0,52:54:00:00:00:02" in app


def test_floating_lcores_name_every_allowed_cpu():
    spec = dpdk.floating_lcores(2)
    assert spec.startswith("(0-1)@(")
    cpus = {int(c) for c in spec[len("(0-1)@(") : -1].split(",")}
    assert cpus == set(__import__("os").sched_getaffinity(0))


def test_port_forward_and_extended_stats_are_parsed():
    assert dpdk.parse_port_stats(PORT_STATS) == dpdk.PortStats(1200, 0, 674400, 0, 0, 32, 0, 2048)
    assert dpdk.parse_forward_stats(STOP) == dpdk.ForwardStats(7, 1, 64, 2)
    assert dpdk.parse_xstats("rx_q0_good_packets: 5\ntx_good_bytes: 64\n") == {
        "rx_q0_good_packets": 5, "tx_good_bytes": 64}
    with pytest.raises(dpdk.TestpmdError):
        dpdk.parse_port_stats("Invalid port 3")
