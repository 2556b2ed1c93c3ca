"""Two test "hosts" on one machine: network namespaces joined by a veth pair.

    hosts = VethHosts.create()           # namespaces pvu-<pid>-<n>-a / -b
    try:
        backend = start_backend(..., command_prefix=hosts.a.prefix)
        dest = Machine(..., command_prefix=hosts.b.prefix,
                       extra_args=["-incoming", f"tcp:{hosts.b.ip}:4444"])
    finally:
        hosts.remove()

A process started with ``netns_exec(name)`` in front of its argv
(``ip netns exec NAME ...``, which execs the command: the pid is the
program's own) sees only its namespace's network: ``lo`` and its end of the
veth, with ``a.address`` or ``b.address``. The file system is the same for
both, so Unix sockets on paths (vhost-user, QMP) and files (disk images,
logs) work across them; only TCP/IP is separated.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2 (scripts/setup.sh
installs it). ``remove()`` deletes both namespaces, which takes the veth
with them once the last process inside has exited.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import subprocess
import time
from dataclasses import dataclass

IP = "ip"
COMMAND_TIMEOUT = 30.0
LINK_UP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
DEFAULT_ADDRESSES = ("10.77.0.1/24", "10.77.0.2/24")

_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace or veth command failed; the message has its output."""


def netns_exec(name: str) -> list[str]:
    """The command prefix that runs a program in the network namespace ``name``."""
    return [IP, "netns", "exec", name]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run([IP, *args], capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{IP} {' '.join(args)}: {e} (is iproute2 installed? "
                         "scripts/setup.sh installs it)") from e
    if check and out.returncode != 0:
        raise NetnsError(f"{IP} {' '.join(args)} failed ({out.returncode}): "
                         f"{(out.stderr or out.stdout).strip()} (needs root)")
    return out


def namespaces() -> list[str]:
    """Names of the network namespaces that ``ip netns`` knows."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


@dataclass(frozen=True)
class Host:
    """One end: a network namespace and the address of its veth interface."""

    netns: str
    interface: str
    address: str                 # with prefix length, e.g. "10.77.0.1/24"

    @property
    def ip(self) -> str:
        """The address alone, e.g. for ``tcp:IP:PORT``."""
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program on this host (see netns_exec)."""
        return netns_exec(self.netns)

    def link_up(self) -> bool:
        """The veth interface's operational state is UP."""
        out = _ip("-n", self.netns, "-o", "link", "show", "dev", self.interface, check=False)
        return out.returncode == 0 and " state UP " in out.stdout


@dataclass(frozen=True)
class VethHosts:
    """Two namespaces ``a`` and ``b`` joined by a veth pair."""

    a: Host
    b: Host

    @classmethod
    def create(cls, addresses: tuple[str, str] = DEFAULT_ADDRESSES,
               tag: str | None = None) -> VethHosts:
        """Create both namespaces and the veth pair, addresses set, links up.

        Names carry this process's pid and a counter (``tag`` overrides that),
        so that concurrent runs do not collide; interface names stay within
        Linux's 15 bytes. Whatever was created is removed if a step fails.
        """
        tag = tag or f"{os.getpid()}-{next(_counter)}"
        short = tag.replace("-", "")[-9:]
        hosts = cls(Host(f"pvu-{tag}-a", f"pvu{short}a", addresses[0]),
                    Host(f"pvu-{tag}-b", f"pvu{short}b", addresses[1]))
        try:
            for h in (hosts.a, hosts.b):
                _ip("netns", "add", h.netns)
            _ip("link", "add", hosts.a.interface, "netns", hosts.a.netns, "type", "veth",
                "peer", "name", hosts.b.interface, "netns", hosts.b.netns)
            for h in (hosts.a, hosts.b):
                _ip("-n", h.netns, "addr", "add", h.address, "dev", h.interface)
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "link", "set", h.interface, "up")
            # The kernel reports a veth end as up (operstate) a moment after
            # both ends were set up, through its link-event worker.
            deadline = time.monotonic() + LINK_UP_TIMEOUT
            while not all(h.link_up() for h in (hosts.a, hosts.b)):
                if time.monotonic() > deadline:
                    raise NetnsError(f"veth {hosts.a.interface}/{hosts.b.interface} not up "
                                     f"after {LINK_UP_TIMEOUT} s")
                time.sleep(POLL_INTERVAL)
        except BaseException:
            hosts.remove(check=False)
            raise
        return hosts

    def remove(self, check: bool = True) -> None:
        """Delete both namespaces (the veth goes with them). Idempotent;
        ``check``: raise if either namespace is still listed afterwards."""
        for h in (self.a, self.b):
            _ip("netns", "delete", h.netns, check=False)
        if check:
            left = [h.netns for h in (self.a, self.b) if h.netns in namespaces()]
            if left:
                raise NetnsError(f"network namespaces still there after delete: {left}")

    def pids(self) -> dict[str, list[int]]:
        """netns -> pids of the processes still inside it (``ip netns pids``)."""
        return {h.netns: [int(p) for p in _ip("netns", "pids", h.netns, check=False)
                          .stdout.split()] for h in (self.a, self.b)}


@dataclass(frozen=True)
class TapHost:
    """A network namespace holding one persistent tap device with an address.

    A vhost-user-net back-end started with ``prefix`` in front of its argv and
    ``--tap interface`` attaches to it; the namespace's own stack (``ip netns
    exec NAME ping ...``, a raw socket opened in it) is the far end.
    """

    netns: str
    interface: str
    address: str                 # with prefix length, e.g. "10.78.0.1/24"

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def prefix(self) -> list[str]:
        return netns_exec(self.netns)

    @classmethod
    def create(cls, address: str = "10.78.0.1/24", tag: str | None = None) -> TapHost:
        """The namespace, the tap (owned by nobody until a back-end attaches), its
        address, and the links up. Whatever was created is removed if a step fails."""
        tag = tag or f"{os.getpid()}-{next(_counter)}"
        host = cls(f"pvu-{tag}-tap", f"pvt{tag.replace('-', '')[-9:]}", address)
        try:
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "tuntap", "add", "dev", host.interface, "mode", "tap")
            _ip("-n", host.netns, "addr", "add", host.address, "dev", host.interface)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "link", "set", host.interface, "up")
        except BaseException:
            host.remove(check=False)
            raise
        return host

    def remove(self, check: bool = True) -> None:
        """Delete the namespace (the tap goes with it). Idempotent."""
        _ip("netns", "delete", self.netns, check=False)
        if check and self.netns in namespaces():
            raise NetnsError(f"network namespace {self.netns} still there after delete")

    def pids(self) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.netns, check=False).stdout.split()]
