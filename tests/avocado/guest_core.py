"""The core scenario, on every cell of the QEMU matrix (matrix.QEMU_MATRIX).

Boot the test guest on our back-end, read the whole disk (md5 against the
host's), write 4 MiB at 4 MiB (read-write cells: the data is on the host
image; read-only cells: the write is refused and the image is unchanged), and
ask the control socket, while the guest holds with the device running, what
the address spaces hold and what was negotiated.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmbase import BOOT_TIMEOUT, VMTestBase  # noqa: E402


class CoreScenario(VMTestBase):
    """:avocado: enable
    :avocado: tags=vm,core
    """

    def test_boot_md5_and_writes(self):
        cell = self.cell
        m = self.make_machine(["queues", "md5", *self.write_steps(), "hold"],
                              serial_input=True)
        m.wait_for("PVU-RESULT hold=waiting", BOOT_TIMEOUT)

        # Stock QEMU: the vendor extension is offered, never acked.
        with self.control() as c:
            status = c.execute("query-status")
        self.log.info("query-status: %s", status)
        self.assertTrue(status["front_end_connected"])
        self.assertFalse(status["extension"])
        self.assertFalse(status["persist_active"])
        self.assertEqual(status["access_platform"], cell.has_viommu)
        spaces = self.address_spaces()
        asid0 = spaces[0]
        if cell.has_viommu:
            # Every ring and buffer address went through ASID 0's IOTLB, filled by
            # QEMU on misses. (What it holds now depends on the guest's last lazy
            # flush, which invalidates everything: no check on "entries".)
            self.assertTrue(asid0["touched"])
            self.assertGreater(asid0["translations"], 0)
            self.assertGreater(asid0["misses"], 0)
        else:
            self.assertTrue(all(s["entries"] == 0 and s["translations"] == 0 for s in spaces),
                            "an IOTLB was used without ACCESS_PLATFORM")

        m.send_serial("go\n")
        [boot] = m.wait_for_done(BOOT_TIMEOUT)
        self.check_boot(boot, m)
        self.assertEqual(m.wait_exit(60), 0)
        self.assertEqual(boot["queues"], str(cell.queues))
        self.assertEqual(int(boot["size"]), os.path.getsize(self.image))
        self.assertEqual(boot["md5"], self.host_md5, "the guest read other data than the host")
        self.check_write(boot)
