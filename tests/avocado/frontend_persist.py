"""The "front-end" value of the persistence axis: NOT QEMU.

QEMU (7.2 and 10.0) never negotiates the back-end's IOTLB persistence extension,
so these cells drive the same back-end (same program, same options as the QEMU
cells) with the project's reference front-end (pyvhost_user.frontend.BlkDriver,
iommu="offset": every address an IOVA, premap=True, extension=True,
persist=True), through the steps of the guest scenarios that make sense
without a guest: whole-disk md5 against the host's, writes checked on the host
image (read-only cells: refused, image unchanged), a loop of device resets
(guest reboots) with I/O between, and the control socket's view of the address
spaces: mappings KEPT across every reset, back to the default only on
RESET_MAP. Cells: matrix.FRONTEND (1 and 4 queues, read-write and read-only).
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyvhost_user.frontend import BlkDriver  # noqa: E402
from pyvhost_user.frontend.blk import BlkIOError, BlkStatusError  # noqa: E402
from vmbase import DEFAULT_STATE, MiB, WRITE_MIB, VMTestBase, md5_file  # noqa: E402

RESETS = 10
SECTOR = 512


class ReferenceFrontEndPersistence(VMTestBase):
    """:avocado: enable
    :avocado: tags=frontend,persistence
    """

    def connect(self) -> BlkDriver:
        return BlkDriver.connect(self.backend.socket_path, num_queues=self.cell.queues,
                                 iommu="offset", premap=True, extension=True, persist=True)

    def asid0(self) -> dict:
        return self.address_spaces()[0]

    def io_round(self, driver: BlkDriver, n: int) -> None:
        """Whole-disk md5 against the host's, then a 64 KiB write (or its refusal)."""
        data = driver.read_all()
        self.assertEqual(hashlib.md5(data).hexdigest(), md5_file(self.image),
                         f"round {n}: the front-end read other data than the host image")
        sector = (WRITE_MIB * MiB) // SECTOR + 128 * n
        payload = os.urandom(64 * 1024)
        if self.cell.read_only:
            before = md5_file(self.image)
            with self.assertRaises((BlkIOError, BlkStatusError)):
                driver.write(sector, payload)
            self.assertEqual(md5_file(self.image), before, "read-only image changed")
        else:
            driver.write(sector, payload)
            with open(self.image, "rb") as f:
                f.seek(sector * SECTOR)
                self.assertEqual(f.read(len(payload)), payload,
                                 f"round {n}: the write is not on the host image")

    def test_resets_keep_mappings_until_reset_map(self):
        with self.connect() as driver:
            fe = driver.frontend
            self.assertTrue(fe.extension and fe.persist, "extension/persistence not negotiated")
            with self.control() as c:
                status = c.execute("query-status")
            self.log.info("query-status: %s", status)
            self.assertTrue(status["persist_active"] and status["access_platform"])
            self.io_round(driver, 0)
            mapped = self.asid0()
            self.assertEqual(mapped["state"], "mapped")
            self.assertGreater(mapped["entries"], 0)
            sent = fe.iotlb_messages_sent

            for n in range(1, RESETS + 1):
                driver.reboot()
                now = self.asid0()
                # Kept: the same entries, and no message was needed to get them back.
                self.assertEqual((now["state"], now["entries"], now["mapped_bytes"]),
                                 (mapped["state"], mapped["entries"], mapped["mapped_bytes"]),
                                 f"reset {n}: the mappings changed")
                self.io_round(driver, n)
            self.assertEqual(fe.iotlb_messages_sent, sent, "IOTLB messages after resets")
            self.assertEqual(fe.iotlb_counters["miss_received"], 0)
            reset, kept = self.device_resets()
            self.assertGreaterEqual(kept, RESETS)
            self.assertEqual(reset, 0, "a reset dropped the IOTLBs despite persistence")

            fe.reset_map(0)
            after = self.asid0()
            self.assertEqual((after["state"], after["entries"]),
                             (DEFAULT_STATE[after["default"]], 0),
                             "RESET_MAP did not return ASID 0 to its default")
            # The VMM maps again after RESET_MAP (premap at the next start): I/O works.
            driver.reboot()
            self.io_round(driver, RESETS + 1)
            self.assertGreater(self.asid0()["entries"], 0)
