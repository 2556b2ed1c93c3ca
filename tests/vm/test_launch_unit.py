"""Unit tests of the launch package that need no QEMU."""

from __future__ import annotations

import pytest
from pyvhost_user.launch import VhostUserBlk, kernel_args, parse_results

LOG = """\
SeaBIOS (version 1.16.2-debian-1.16.2-1)
[    1.837311] Run /init as init process
PVU-BOOT
PVU-RESULT queues=1
PVU-RESULT size=67108864
[    2.1] some kernel message PVU-RESULT md5=0123abc
PVU-DONE
[   23.871442] reboot: Restarting system
PVU-BOOT\r
PVU-ERROR no block device /dev/vda after 20 s\r
PVU-RESULT disk=missing\r
PVU-DMESG [    1.349393] mip6: Mobile IPv6
PVU-BOOT
PVU-RESULT md5=ff
"""


def test_parse_results_splits_boots():
    boots = parse_results(LOG)
    assert len(boots) == 3
    assert boots[0] == {"queues": "1", "size": "67108864", "md5": "0123abc"}
    assert boots[0].done and not boots[0].errors
    assert boots[1] == {"disk": "missing"}
    assert not boots[1].done
    assert boots[1].errors == ["no block device /dev/vda after 20 s"]
    assert boots[1].dmesg == ["[    1.349393] mip6: Mobile IPv6"]
    assert boots[2] == {"md5": "ff"} and not boots[2].done


def test_parse_results_ignores_text_before_first_boot():
    assert parse_results("PVU-RESULT a=1\nPVU-DONE\n") == []


def test_kernel_args():
    assert kernel_args(["md5", "write"], write_mib=8, reboot=True) == [
        "pvu_steps=md5,write", "pvu_write_mib=8", "pvu_reboot=1"]
    assert kernel_args("queues", disk="vdb", pvu_x=3) == [
        "pvu_steps=queues", "pvu_disk=vdb", "pvu_x=3"]
    with pytest.raises(ValueError):
        kernel_args(["fio"])
    with pytest.raises(ValueError):
        kernel_args([], **{"a.b": 1})


def test_vhost_user_blk_args():
    d = VhostUserBlk("/s,ock", num_queues=2, reconnect=1, options={"queue-size": 128,
                                                                  "config-wce": False})
    assert d.args(0) == [
        "-chardev", "socket,id=char-blk0,path=/s,,ock,reconnect=1",
        "-device", ("vhost-user-blk-pci,id=blk0,chardev=char-blk0,num-queues=2,"
                    "queue-size=128,config-wce=off")]
    with pytest.raises(ValueError):
        VhostUserBlk("/" + "x" * 120).args(0)


def test_parse_results_keeps_every_value_of_a_repeated_step():
    [boot] = parse_results("PVU-BOOT\nPVU-RESULT md5=aa\nPVU-RESULT rebind=ok\n"
                           "PVU-RESULT md5=bb\nPVU-DONE\n")
    assert boot["md5"] == "bb"
    assert boot.all == {"md5": ["aa", "bb"], "rebind": ["ok"]}


def test_viommu_machine_arguments(tmp_path):
    from pyvhost_user.launch import Machine

    m = Machine("7.2", tmp_path, disks=[VhostUserBlk("/tmp/a.sock"),
                                        VhostUserBlk("/tmp/b.sock", iommu=False)],
                viommu=True, kernel="k", initrd="i")
    a = m.args()
    devices = [a[i + 1] for i, w in enumerate(a) if w == "-device"]
    assert devices[0] == "intel-iommu,intremap=on,device-iotlb=on"
    assert devices[1] == "pcie-root-port,id=rp-blk0,bus=pcie.0,chassis=1"
    assert devices[2].endswith(",iommu_platform=on,ats=on,disable-legacy=on,bus=rp-blk0")
    assert "iommu_platform" not in devices[3] and "bus=" not in devices[3]
    assert "intel_iommu=on" in m.kernel_cmdline.split()
    assert "kernel-irqchip" not in " ".join(a)          # TCG needs none
    plain = Machine("7.2", tmp_path, disks=[VhostUserBlk("/tmp/a.sock")], kernel="k", initrd="i")
    assert "intel-iommu" not in " ".join(plain.args())
    assert "intel_iommu" not in plain.kernel_cmdline


def test_vhost_user_net_packed_and_behind_the_viommu():
    from pyvhost_user.launch.net import VhostUserNet

    plain = VhostUserNet("/s.sock", "52:54:00:00:00:01").args(0)
    assert plain[-1] == "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01"
    assert "pcie-root-port" not in " ".join(plain)
    args = VhostUserNet("/s.sock", "52:54:00:00:00:01", packed=True, iommu=True,
                        options={"vectors": 0}).args(1)
    assert args[-4:-2] == ["-device", "pcie-root-port,id=rp-net1,bus=pcie.0,chassis=102"]
    assert args[-1] == ("virtio-net-pci,netdev=net1,mac=52:54:00:00:00:01,vectors=0,packed=on,"
                        "iommu_platform=on,ats=on,disable-legacy=on,bus=rp-net1")
    # a bus of the caller's choosing: no port of ours
    args = VhostUserNet("/s.sock", "52:54:00:00:00:01", iommu=True, options={"bus": "pcie.0"}).args(0)
    assert "pcie-root-port" not in " ".join(args) and ",bus=pcie.0," in args[-1]
