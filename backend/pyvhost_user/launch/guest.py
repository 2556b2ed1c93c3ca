"""The test guest (kernel + initramfs) and the parser of its serial console.

The guest's ``/init`` is ``guest-images/init.sh``; it is driven by kernel
command-line words and prints marker lines on ttyS0::

    PVU-BOOT                 start of every boot
    PVU-RESULT name=value    one result of a step
    PVU-ERROR text           something went wrong
    PVU-DMESG text           kernel log tail (after a failed step)
    PVU-DONE                 all steps done (then poweroff, or reboot)
    PVU-ACK i                step "seqwrite": record i written (see seqwrite.py)
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

from .qemu_binaries import cache_dir

BUILDER_ENV = "PYVHOST_USER_GUEST_BUILDER"
BUILDER_REL = Path("guest-images") / "build-guest.py"

# Steps /init knows (pvu_steps=...).
STEPS = ("queues", "md5", "md5parts", "write", "writefail", "rebind", "seqwrite", "hold",
         "ping", "release")


class GuestImageError(RuntimeError):
    """The guest image is missing and could not be built."""


def builder_script() -> Path | None:
    """guest-images/build-guest.py of this checkout (or $PYVHOST_USER_GUEST_BUILDER)."""
    env = os.environ.get(BUILDER_ENV)
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / BUILDER_REL
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=1)
def _build(cache: str) -> tuple[Path, Path]:
    guest = Path(cache) / "guest"
    kernel, initrd = guest / "vmlinuz", guest / "initrd.gz"
    script = builder_script()
    if script is None:
        if kernel.exists() and initrd.exists():
            return kernel, initrd   # an installed package without the checkout
        raise GuestImageError(
            f"no guest image in {guest} and no {BUILDER_REL} to build it "
            f"(set {BUILDER_ENV}, or run scripts/setup.sh in the checkout)")
    # Always ask the builder: it returns at once when the image is up to date,
    # and rebuilds it when init.sh or the builder changed.
    try:
        out = subprocess.run([sys.executable, str(script), "--cache", cache],
                             capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestImageError(f"{script} could not run: {e}") from e
    if out.returncode != 0:
        raise GuestImageError(
            f"{script} failed (exit {out.returncode}); run scripts/setup.sh:\n"
            f"{out.stderr.strip()}")
    if not (kernel.exists() and initrd.exists()):
        raise GuestImageError(f"{script} did not produce {kernel} and {initrd}")
    return kernel, initrd


def guest_image() -> tuple[Path, Path]:
    """(kernel, initrd) of the test guest; built (or refreshed) when needed."""
    return _build(str(cache_dir()))


def kernel_args(steps=("md5",), *, disk: str | None = None, write_mib: int | None = None,
                reboot: bool = False, quiet: bool = True, **extra) -> list[str]:
    """Kernel command-line words for /init (without console=...).

    ``extra`` adds ``name=value`` words verbatim (names must not contain dots).
    """
    steps = [steps] if isinstance(steps, str) else list(steps)
    for s in steps:
        if s not in STEPS:
            raise ValueError(f"unknown guest step {s!r}; known: {STEPS}")
    words = []
    if steps:
        words.append("pvu_steps=" + ",".join(steps))
    if disk is not None:
        words.append(f"pvu_disk={disk}")
    if write_mib is not None:
        words.append(f"pvu_write_mib={int(write_mib)}")
    if reboot:
        words.append("pvu_reboot=1")
    if not quiet:
        words.append("pvu_quiet=0")
    for k, v in extra.items():
        if "." in k:
            raise ValueError(f"{k!r}: a dot makes it a module parameter")
        words.append(f"{k}={v}")
    return words


class BootResults(dict):
    """The ``PVU-RESULT`` values of one boot (name -> value, last one wins).

    ``all``: name -> every value in order (a step that runs twice, e.g. md5
    before and after a rebind); ``done``: PVU-DONE was seen; ``errors``:
    PVU-ERROR texts; ``dmesg``: PVU-DMESG lines; ``lines``: this boot's marker
    lines.
    """

    def __init__(self) -> None:
        super().__init__()
        self.all: dict[str, list[str]] = {}
        self.done = False
        self.errors: list[str] = []
        self.dmesg: list[str] = []
        self.lines: list[str] = []

    def __repr__(self) -> str:
        return (f"BootResults({dict.__repr__(self)}, done={self.done}, "
                f"errors={self.errors!r})")


# Markers are searched anywhere in a line: a console line may start with
# leftovers of a kernel message.
_MARKER = re.compile(r"PVU-(BOOT|DONE|RESULT|ERROR|DMESG)\b ?(.*)")
_RESULT = re.compile(r"([A-Za-z0-9_]+)=(\S*)")


def parse_results(text: str) -> list[BootResults]:
    """Split a serial log on PVU-BOOT; one BootResults (a dict) per boot."""
    boots: list[BootResults] = []
    for raw in text.splitlines():
        m = _MARKER.search(raw.replace("\r", ""))
        if not m:
            continue
        kind, rest = m.group(1), m.group(2).strip()
        if kind == "BOOT":
            boots.append(BootResults())
            continue
        if not boots:
            continue   # before the first PVU-BOOT: not ours
        boot = boots[-1]
        boot.lines.append(m.group(0))
        if kind == "DONE":
            boot.done = True
        elif kind == "RESULT":
            r = _RESULT.match(rest)
            if r:
                boot[r.group(1)] = r.group(2)
                boot.all.setdefault(r.group(1), []).append(r.group(2))
        elif kind == "ERROR":
            boot.errors.append(rest)
        elif kind == "DMESG":
            boot.dmesg.append(rest)
    return boots


def count_done(text: str) -> int:
    """How many boots have reached PVU-DONE in ``text``."""
    return sum(1 for b in parse_results(text) if b.done)
