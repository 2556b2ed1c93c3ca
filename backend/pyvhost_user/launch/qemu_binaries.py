"""Where the QEMU binaries are: 7.2 from Debian, 10.0 unpacked by scripts/setup.sh."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "PYVHOST_USER_CACHE"
SUPPORTED_VERSIONS = ("7.2", "10.0")
SYSTEM_QEMU = Path("/usr/bin/qemu-system-x86_64")
SYSTEM_QSD = Path("/usr/bin/qemu-storage-daemon")
SYSTEM_SEABIOS = Path("/usr/share/seabios")


class QemuNotFoundError(RuntimeError):
    """A QEMU binary is missing or is not the version asked for."""


def cache_dir() -> Path:
    """``$PYVHOST_USER_CACHE``, else ``~/.cache/pyvhost-user`` (as scripts/setup.sh)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "pyvhost-user"


def qemu10_dir() -> Path:
    """Root of the QEMU 10.0 tree unpacked by scripts/setup.sh."""
    return cache_dir() / "qemu-10.0"


@dataclass(frozen=True)
class QemuBinary:
    """A QEMU system emulator and how to run it.

    ``command(*args)`` gives the argv (binary + guard options + args);
    ``environ()`` the environment to run it with.
    """

    version: str                      # "7.2" or "10.0"
    path: Path                        # qemu-system-x86_64
    full_version: str = ""            # e.g. "10.0.2 (Debian 1:10.0.2+ds-2...)"
    env: dict[str, str] = field(default_factory=dict)   # extra environment
    base_args: tuple[str, ...] = ()   # options that must come with every run (-L ...)
    storage_daemon: Path | None = None  # the qemu-storage-daemon of the same build

    def command(self, *args: str) -> list[str]:
        return [str(self.path), *self.base_args, *args]

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env


def _missing(version: str, what: str) -> QemuNotFoundError:
    return QemuNotFoundError(
        f"QEMU {version}: {what}. Run scripts/setup.sh (it installs QEMU 7.2 from "
        f"Debian and unpacks QEMU 10.0 from bookworm-backports into {cache_dir()}).")


@functools.cache
def _probe_version(path: str, env_items: tuple[tuple[str, str], ...]) -> str:
    env = dict(os.environ)
    env.update(dict(env_items))
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False,
                             timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    m = re.search(r"version (\S+(?: \([^)]*\))?)", out.stdout)
    return m.group(1) if m else f"error: {out.stdout.strip()} {out.stderr.strip()}"


def find_qemu(version: str) -> QemuBinary:
    """The QEMU system emulator of ``version`` ("7.2" or "10.0").

    Raises QemuNotFoundError (naming scripts/setup.sh) when it is missing or
    reports another version.
    """
    if version == "7.2":
        path, env, base_args = SYSTEM_QEMU, {}, ()
        qsd = SYSTEM_QSD if SYSTEM_QSD.exists() else None
    elif version == "10.0":
        root = qemu10_dir()
        path = root / "usr" / "bin" / "qemu-system-x86_64"
        # Without QEMU_MODULE_DIR (and -nodefaults) QEMU 10 loads 7.2's modules
        # from the system and aborts.
        env = {"QEMU_MODULE_DIR": str(root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu")}
        base_args = ("-L", str(root / "usr" / "share" / "qemu"),
                     "-L", str(SYSTEM_SEABIOS))
        qsd_path = root / "usr" / "bin" / "qemu-storage-daemon"
        qsd = qsd_path if qsd_path.exists() else None
    else:
        raise ValueError(f"unsupported QEMU version {version!r}; "
                         f"choose one of {SUPPORTED_VERSIONS}")
    if not path.exists():
        raise _missing(version, f"{path} does not exist")
    full = _probe_version(str(path), tuple(sorted(env.items())))
    if not full.startswith(version + "."):
        raise _missing(version, f"{path} reports version {full!r}")
    return QemuBinary(version=version, path=path, full_version=full, env=env,
                      base_args=base_args, storage_daemon=qsd)


def qemu_storage_daemon(version: str = "7.2") -> Path:
    """Path of qemu-storage-daemon of QEMU ``version`` (7.2: Debian's)."""
    qsd = find_qemu(version).storage_daemon
    if qsd is None:
        raise _missing(version, "qemu-storage-daemon does not exist")
    return qsd
