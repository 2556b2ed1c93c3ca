"""libvirt for real: a domain (qemu/pyvhost-user-domain.xml.in) on our back-end.

Starts virtlogd and libvirtd (each --daemon with a --pid-file, stopped by that
pid at the end), boots the domain with `virsh -c qemu:///system create`, checks
the guest's md5 and write on our back-end, `virsh reboot` and checks again, then
`virsh destroy`. Needs root and scripts/setup.sh (libvirt packages, the kvm
group and the libvirt-qemu user). libvirt's QEMU runs as libvirt-qemu: the
back-end's socket is opened to that group and every file the domain needs is
in a world-readable temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from avocado import Test
from pyvhost_user.launch import guest_image, kernel_args, parse_results
from pyvhost_user.launch.backends import start_backend

REPO = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
MiB = 1 << 20
WRITE_MIB = 4
BOOT_TIMEOUT = 150.0


def md5_file(path, offset=0, length=None):
    import hashlib
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read() if length is None else f.read(length)).hexdigest()


class LibvirtDomain(Test):
    """:avocado: tags=host,libvirt,vm"""

    timeout = 600

    def setUp(self):
        self.out = Path(self.outputdir)
        self.daemons: list[tuple[str, Path]] = []
        self.domain = f"pvu-avocado-{os.getpid()}"
        self.created = False
        self.backend = None
        self.dir = Path(tempfile.mkdtemp(prefix="pvu-libvirt-"))
        self.dir.chmod(0o755)        # libvirt-qemu must reach the socket and the files
        for d in ("/var/log/libvirt", "/var/run/libvirt"):
            os.makedirs(d, exist_ok=True)
        self.start_daemon("virtlogd")
        self.start_daemon("libvirtd")
        self.wait_libvirt()

    def start_daemon(self, name: str) -> None:
        binary = shutil.which(name) or f"/usr/sbin/{name}"
        pid_file = self.dir / f"{name}.pid"
        subprocess.run([binary, "--daemon", "--pid-file", str(pid_file)], check=True,
                       timeout=60)
        self.daemons.append((name, pid_file))

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                            timeout=120)
        self.log.info("virsh %s -> %d\n%s%s", " ".join(args), cp.returncode, cp.stdout,
                      cp.stderr)
        if check and cp.returncode != 0:
            self.fail(f"virsh {' '.join(args)} failed: {cp.stderr.strip()}")
        return cp

    def wait_libvirt(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                self.fail("libvirtd did not answer within 60 s")
            time.sleep(0.2)

    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return ""

    def wait_serial(self, predicate, what: str, timeout: float = BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            boots = parse_results(self.serial())
            value = predicate(boots)
            if value:
                return boots
            if time.monotonic() > deadline:
                self.fail(f"timeout ({timeout} s) waiting for {what}; console tail:\n"
                          + "\n".join(self.serial().splitlines()[-40:]))
            time.sleep(0.1)

    def test_domain_boot_io_reboot_destroy(self):
        image = self.dir / "disk.img"
        with open(image, "wb") as f:
            f.writelines(os.urandom(MiB) for _ in range(16))
        original = (md5_file(image, 0, WRITE_MIB * MiB), md5_file(image, WRITE_MIB * MiB, 4 * MiB),
                    md5_file(image, (WRITE_MIB + 4) * MiB))
        kernel, initrd = guest_image()
        shutil.copy(kernel, self.dir / "vmlinuz")
        shutil.copy(initrd, self.dir / "initrd.gz")
        sock = self.dir / "blk.sock"
        self.backend = start_backend(
            "pyvhost", image, sock, log_path=self.out / "backend.log",
            extra_args=("--socket-mode", "660", "--socket-group", "libvirt-qemu"))
        image.chmod(0o644)
        self.serial_log = self.dir / "serial.log"
        cmdline = " ".join(["console=ttyS0", "panic=-1",
                            *kernel_args(["md5parts", "write"], write_mib=WRITE_MIB)])
        xml = (REPO / "qemu" / "pyvhost-user-domain.xml.in").read_text()
        for key, value in {"NAME": self.domain, "KERNEL": self.dir / "vmlinuz",
                           "INITRD": self.dir / "initrd.gz", "CMDLINE": cmdline,
                           "SOCKET": sock, "SERIAL_LOG": self.serial_log,
                           "QUEUES": 1}.items():
            xml = xml.replace(f"@{key}@", str(value))
        domain_xml = self.out / "domain.xml"
        domain_xml.write_text(xml)
        self.virsh("create", str(domain_xml))
        self.created = True

        # virsh reboot on a guest without an ACPI daemon: libvirt sends the ACPI
        # power button and marks the domain for a "fake reboot"; when the guest
        # powers off after its steps, libvirt resets it instead of stopping it.
        self.wait_serial(lambda b: len(b) >= 1, "the first PVU-BOOT")
        self.virsh("reboot", self.domain)
        boots = self.wait_serial(lambda b: len(b) >= 2 and b[0].done, "a second boot")
        first = boots[0]
        self.assertFalse(first.errors, first.errors)
        self.assertEqual((first["md5_head"], first["md5_range"], first["md5_tail"]), original)
        self.assertEqual(first["write"], "ok")
        self.assertEqual(first["readback_md5"], first["write_md5"])

        self.virsh("reboot", self.domain)    # boot 2 resets too, rather than stop
        boots = self.wait_serial(lambda b: len(b) >= 2 and b[1].done, "the second boot's steps")
        second = boots[1]
        on_host = md5_file(image, WRITE_MIB * MiB, 4 * MiB)
        self.assertFalse(second.errors, second.errors)
        # The second boot read what the first one wrote, through our back-end.
        self.assertEqual((second["md5_head"], second["md5_range"], second["md5_tail"]),
                         (original[0], first["write_md5"], original[2]))
        self.assertEqual(second["write"], "ok")
        later = {b["write_md5"] for b in parse_results(self.serial()) if "write_md5" in b}
        self.assertIn(on_host, later)
        self.virsh("destroy", self.domain)
        self.created = False
        self.assertIn("ring 0 started", self.backend.log())

    def tearDown(self):
        if self.created:
            self.virsh("destroy", self.domain, check=False)
        if self.backend is not None:
            self.backend.stop()
        if hasattr(self, "serial_log") and self.serial_log.exists():
            shutil.copy(self.serial_log, self.out / "serial.log")
        qemu_log = Path("/var/log/libvirt/qemu") / f"{self.domain}.log"
        if qemu_log.exists():
            shutil.copy(qemu_log, self.out / "qemu.log")
        for name, pid_file in reversed(self.daemons):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                self.log.warning("%s: no pid file %s", name, pid_file)
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)
