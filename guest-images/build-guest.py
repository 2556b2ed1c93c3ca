#!/usr/bin/env python3
"""Build the test guest: a Debian cloud kernel and a busybox initramfs.

Output (in the cache, ``${PYVHOST_USER_CACHE:-$HOME/.cache/pyvhost-user}``):

    guest/vmlinuz     the kernel of the current linux-image-cloud-amd64
    guest/initrd.gz   gzip'd newc cpio: busybox, virtio modules (+ depmod), /init

``/init`` is ``guest-images/init.sh`` next to this script. The image is rebuilt
only when init.sh or this script changed (a hash is stored with it), or with
``--force``; the downloaded packages are kept and reused.

Needs: apt-get, apt-cache, dpkg, depmod, modinfo (kmod). Python stdlib only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SH = HERE / "init.sh"

# Loaded by init.sh in this order; copied here with their dependencies.
MODULES = [
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_pci", "virtio_blk", "failover", "net_failover", "virtio_net",
]
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"build-guest: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    env = os.environ.get("PYVHOST_USER_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "pyvhost-user"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} not found (run scripts/setup.sh)") from e
    except subprocess.CalledProcessError as e:
        raise BuildError(
            f"{' '.join(cmd)} failed ({e.returncode}):\n{e.stdout}{e.stderr}") from e


def inputs_hash() -> str:
    h = hashlib.sha256()
    for p in (INIT_SH, Path(__file__).resolve()):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# ---- packages -----------------------------------------------------------------

def kernel_package() -> str:
    """The exact kernel package linux-image-cloud-amd64 depends on now."""
    out = run(["apt-cache", "depends", KERNEL_META]).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            if name.startswith("linux-image-") and name != KERNEL_META:
                return name
    raise BuildError(f"no kernel package in 'apt-cache depends {KERNEL_META}':\n{out}"
                     "(is the apt package list there? run: apt-get update)")


def download(pkg: str, debs: Path) -> Path:
    """apt-get download PKG into DEBS unless a .deb of it is already there."""
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    log(f"downloading {pkg}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # Readable by apt's sandbox user, so apt does not warn when root.
        os.chmod(tmp, 0o755)
        cmd = ["apt-get", "download", "-q", pkg]
        if os.geteuid() == 0:
            # apt's sandbox user may not enter a cache under a private home.
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        run(cmd, cwd=tmp)
        got = list(Path(tmp).glob(f"{pkg}_*.deb"))
        if len(got) != 1:
            raise BuildError(f"apt-get download {pkg} gave {got}")
        dest = debs / got[0].name
        os.replace(got[0], dest)
    return dest


def unpack(deb: Path, dest: Path) -> Path:
    """dpkg -x DEB into DEST (once: a stamp names the deb)."""
    stamp = dest / ".unpacked-from"
    if stamp.exists() and stamp.read_text() == deb.name:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    log(f"unpacking {deb.name}")
    run(["dpkg", "-x", str(deb), str(dest)])
    stamp.write_text(deb.name)
    return dest


# ---- modules ------------------------------------------------------------------

def norm(name: str) -> str:
    return name.replace("-", "_")


def module_index(moddir: Path) -> dict[str, Path]:
    index = {}
    for p in moddir.rglob("*.ko*"):
        base = p.name.split(".ko")[0]
        index[norm(base)] = p
    return index


def module_deps(path: Path) -> list[str]:
    out = run(["modinfo", "-F", "depends", str(path)]).stdout.strip()
    return [norm(d) for d in out.split(",") if d.strip()]


def builtin_modules(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    if not f.exists():
        return set()
    return {norm(Path(line.strip()).name.split(".ko")[0])
            for line in f.read_text().splitlines() if line.strip()}


def resolve_modules(moddir: Path, wanted: list[str]) -> list[Path]:
    index = module_index(moddir)
    builtin = builtin_modules(moddir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            return
        if name not in index:
            raise BuildError(f"module {name} (needed by {' <- '.join(chain) or 'init'}) "
                             f"not found under {moddir}")
        for dep in module_deps(index[name]):
            visit(dep, chain + (name,))
        order.append(index[name])

    for name in wanted:
        visit(norm(name), ())
    return order


# ---- cpio ---------------------------------------------------------------------

class Cpio:
    """A minimal newc ("070701") cpio writer."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.mtime = int(time.time())

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, self.mtime, len(data), 0, 0, 0, 0,
                  len(name_b), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + name_b)
        self.buf.write(b"\0" * (-(len(hdr) + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add ROOT's contents (sorted), named PREFIX/relative path."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = prefix if rel == "." else f"{prefix}/{rel}".lstrip("/")
            if base:
                self.dir(base)
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                name = f"{base}/{fn}".lstrip("/")
                if p.is_symlink():
                    self.symlink(name, os.readlink(p))
                else:
                    self.file(name, p.read_bytes(), p.stat().st_mode & 0o777)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


# ---- build --------------------------------------------------------------------

def build(cache: Path, force: bool = False) -> tuple[Path, Path]:
    guest = cache / "guest"
    kernel_out = guest / "vmlinuz"
    initrd_out = guest / "initrd.gz"
    stamp = guest / "build.json"
    want = inputs_hash()
    if not force and kernel_out.exists() and initrd_out.exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("inputs") == want:
                return kernel_out, initrd_out
        except ValueError:
            pass

    t0 = time.monotonic()
    guest.mkdir(parents=True, exist_ok=True)
    debs = guest / "debs"
    kpkg = kernel_package()
    kdeb = download(kpkg, debs)
    bdeb = download(BUSYBOX, debs)
    kroot = unpack(kdeb, guest / "unpacked" / "kernel")
    broot = unpack(bdeb, guest / "unpacked" / "busybox")

    mods_root = kroot / "lib" / "modules"
    kvers = sorted(p.name for p in mods_root.iterdir()) if mods_root.is_dir() else []
    if len(kvers) != 1:
        raise BuildError(f"expected one kernel version in {mods_root}, found {kvers}")
    kver = kvers[0]
    vmlinuz = kroot / "boot" / f"vmlinuz-{kver}"
    busybox = broot / "bin" / "busybox"
    for p in (vmlinuz, busybox):
        if not p.exists():
            raise BuildError(f"missing {p}")

    modules = resolve_modules(mods_root / kver, MODULES)
    log(f"kernel {kver}; modules: {' '.join(p.name for p in modules)}")

    with tempfile.TemporaryDirectory(dir=guest) as tmp:
        stage = Path(tmp) / "root"
        moddir = stage / "lib" / "modules" / kver
        for p in modules:
            rel = p.relative_to(mods_root / kver)
            dest = moddir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = p.read_bytes()
            if p.name.endswith(".ko.xz"):
                data, dest = lzma.decompress(data), dest.with_name(p.name[:-3])
            elif p.name.endswith(".ko.gz"):
                data, dest = gzip.decompress(data), dest.with_name(p.name[:-3])
            elif not p.name.endswith(".ko"):
                raise BuildError(f"unsupported module compression: {p}")
            dest.write_bytes(data)
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            src = mods_root / kver / f
            if src.exists():
                shutil.copy(src, moddir / f)
        run(["depmod", "-b", str(stage), kver])

        cpio = Cpio()
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                  "tmp", "run", "etc"):
            cpio.dir(d)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", INIT_SH.read_bytes(), 0o755)
        cpio.tree(stage / "lib", "lib")
        data = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)

    tmp_initrd = initrd_out.with_suffix(".tmp")
    tmp_initrd.write_bytes(data)
    shutil.copy(vmlinuz, kernel_out.with_suffix(".tmp"))
    os.replace(kernel_out.with_suffix(".tmp"), kernel_out)
    os.replace(tmp_initrd, initrd_out)
    stamp.write_text(json.dumps({
        "inputs": want, "kernel_package": kdeb.name, "kernel_version": kver,
        "busybox_package": bdeb.name, "modules": [p.name for p in modules],
    }, indent=1) + "\n")
    log(f"built {initrd_out} ({len(data)} bytes) in {time.monotonic() - t0:.1f} s")
    return kernel_out, initrd_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache directory (default: $PYVHOST_USER_CACHE or "
                         "~/.cache/pyvhost-user)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    try:
        kernel, initrd = build(args.cache or cache_dir(), force=args.force)
    except BuildError as e:
        print(f"build-guest: error: {e}", file=sys.stderr)
        return 1
    print(kernel)
    print(initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
