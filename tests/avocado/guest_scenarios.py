"""Heavier guest scenarios, on the covering subset of the QEMU matrix (matrix.COVERING).

Each checks the guest's I/O (md5 of what the host expects, writes on the host
image or refused) after the disruption, and the back-end's view of the address
spaces through the control socket (stock QEMU: every device reset returns the
IOTLBs to their default, none keeps them).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmbase import BOOT_TIMEOUT, MiB, WRITE_MIB, VMTestBase, md5_file  # noqa: E402

REBOOTS = 10


class GuestScenarios(VMTestBase):
    """:avocado: enable
    :avocado: tags=vm,scenarios
    """

    def io_steps(self) -> list[str]:
        return ["md5parts", *self.write_steps()]

    def check_parts(self, boot, expected: tuple[str, str, str]) -> None:
        self.assertEqual((boot["md5_head"], boot["md5_range"], boot["md5_tail"]), expected,
                         "the guest read other data than the image held")

    def parts_now(self) -> tuple[str, str, str]:
        return (md5_file(self.image, 0, WRITE_MIB * MiB),
                md5_file(self.image, WRITE_MIB * MiB, 4 * MiB),
                md5_file(self.image, (WRITE_MIB + 4) * MiB))

    def test_reboot_loop(self):
        """10 guest reboots (each a device reset), I/O in every boot; each boot
        reads exactly what the previous one left."""
        original = self.parts_now()
        m = self.make_machine(self.io_steps(), reboot=True)
        boots = m.wait_for_done(BOOT_TIMEOUT * 4, boots=REBOOTS + 1)
        # Stop the guest before a later boot writes, so the image is checked
        # against the last boot we read (later boots' writes are accepted too).
        m.qmp_command("stop")
        boots = m.results()
        done = [b for b in boots if b.done]
        self.assertGreaterEqual(len(done), REBOOTS + 1)
        expected = original
        for n, boot in enumerate(done):
            self.check_boot(boot, m)
            self.check_parts(boot, expected)
            if self.cell.read_only:
                self.assertEqual(boot["write"], "refused", f"boot {n}")
            else:
                self.assertEqual(boot["write"], "ok", f"boot {n}")
                self.assertEqual(boot["readback_md5"], boot["write_md5"], f"boot {n}")
                expected = (original[0], boot["write_md5"], original[2])
        later_writes = {b["write_md5"] for b in boots if "write_md5" in b}
        on_host = self.parts_now()
        self.assertEqual((on_host[0], on_host[2]), (original[0], original[2]))
        if self.cell.read_only:
            self.assertEqual(on_host, original)
        else:
            self.assertIn(on_host[1], later_writes)
        resets = [e for e in m.events if e.get("event") == "RESET"]
        self.assertGreaterEqual(len(resets), REBOOTS, "fewer RESET events than reboots")
        # Firmware and kernel reset the device at every boot.
        self.check_stock_resets(at_least=REBOOTS)

    def test_rebind(self):
        """The guest unbinds virtio_blk and binds it again (a device reset by the
        driver, rings freed and made again), then reads and writes."""
        m = self.make_machine(["md5", "rebind", "md5", *self.write_steps(), "rebind",
                               "md5parts"], guest_args={"pvu_hog_kib": 8192})
        [boot] = m.wait_for_done(BOOT_TIMEOUT)
        self.check_boot(boot, m)
        self.assertEqual(boot.all["rebind"], ["ok", "ok"])
        self.assertEqual(boot.all["md5"], [self.host_md5, self.host_md5])
        self.check_write(boot)
        self.check_parts(boot, self.parts_now())
        self.check_stock_resets(at_least=2)

    def test_backend_restart_while_idle(self):
        """The back-end crashes (SIGKILL) and a new one starts while the guest
        holds with no I/O; QEMU reconnects (chardev reconnect=1) and I/O works."""
        m = self.make_machine(["md5", "hold", "md5", *self.write_steps()],
                              disks=[self.device(reconnect=1)], serial_input=True)
        m.wait_for("PVU-RESULT hold=waiting", BOOT_TIMEOUT)
        old = self.backend
        self.crash_and_restart_backend()
        self.wait_backend_rings_started(self.backend, self.cell.queues)
        self.log.info("QEMU reconnected to the new back-end (pid %d)", self.backend.pid)
        # A new back-end starts with fresh address spaces; QEMU maps again on demand.
        for space in self.address_spaces():
            self.assertEqual(space["state"] == "mapped", space["entries"] > 0)
        m.send_serial("go\n")
        [boot] = m.wait_for_done(BOOT_TIMEOUT)
        self.check_boot(boot, m)
        self.assertEqual(boot.all["md5"], [self.host_md5, self.host_md5])
        self.check_write(boot)
        self.assertFalse(old.alive())
        self.assertIn("<- SET_VRING_BASE", self.backend.log())
        self.assertEqual(m.wait_exit(60), 0)

    def test_system_reset_under_io(self):
        """QMP system_reset while the guest reads the disk; the next boot reads
        and writes correctly."""
        m = self.make_machine(["md5", *self.write_steps(), "hold"], reboot=True,
                              serial_input=True)
        # The md5 step has started reading (size is printed just before the dd).
        m.wait_for("PVU-RESULT size=", BOOT_TIMEOUT)
        m.qmp_command("system_reset")
        m.wait_for("PVU-RESULT hold=waiting", BOOT_TIMEOUT)
        boots = m.results()
        self.assertEqual(len(boots), 2, "system_reset did not reboot the guest exactly once")
        self.assertNotIn("write", boots[0], "the reset came after the first boot's md5")
        self.assertEqual(boots[1]["md5"], self.host_md5)
        self.check_write(boots[1])
        m.wait_for_event("RESET", timeout=10)
        self.check_stock_resets(at_least=1)

    def test_hot_unplug_and_replug(self):
        """device_del while the guest holds, then device_add on the same chardev:
        the guest finds the disk again and reads and writes it."""
        m = self.make_machine(["md5", "hold", "md5", *self.write_steps()],
                              disks=[self.device(root_port=True)], serial_input=True)
        m.wait_for("PVU-RESULT hold=waiting", BOOT_TIMEOUT)
        resets_before = self.device_resets()[0]
        m.device_del("blk0")
        # Unplugged: the device is reset and the address spaces are at their default.
        self.check_spaces_at_default()
        with self.control() as c:
            rings = c.execute("query-status")["rings"]
        self.assertFalse(any(r["started"] for r in rings), f"rings still started: {rings}")
        m.device_add(m.disks[0], 0)
        m.send_serial("go\n")
        [boot] = m.wait_for_done(BOOT_TIMEOUT)
        self.check_boot(boot, m)
        self.assertEqual(boot.all["md5"], [self.host_md5, self.host_md5])
        self.check_write(boot)
        self.assertEqual(m.wait_exit(60), 0)
        self.assertGreater(self.device_resets()[0], resets_before)
        self.check_stock_resets(at_least=1)
