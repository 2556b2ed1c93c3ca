"""The JSON back-end descriptor under qemu/ agrees with `vhost-user-blk --print-capabilities`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from avocado import Test

REPO = Path(__file__).resolve().parents[2]


class BackendDescriptor(Test):
    """:avocado: tags=host,libvirt"""

    def test_descriptor_matches_print_capabilities(self):
        descriptor = json.loads((REPO / "qemu" / "50-pyvhost-user-blk.json").read_text())
        out = subprocess.run([sys.executable, "-m", "pyvhost_user.cli.blk",
                              "--print-capabilities"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        caps = json.loads(out)
        self.log.info("descriptor %s; capabilities %s", descriptor, caps)
        self.assertEqual(descriptor["type"], caps["type"])
        self.assertEqual(descriptor["type"], "block")
        self.assertEqual(Path(descriptor["binary"]).name, "vhost-user-blk")
        # libvirt reads only these members; an unknown one is a typo.
        self.assertLessEqual(set(descriptor), {"description", "type", "binary", "tags"})
        for feature in caps.get("features", []):
            self.assertIsInstance(feature, str)
