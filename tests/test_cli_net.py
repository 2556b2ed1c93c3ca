"""The vhost-user-net program: the same conventions as vhost-user-blk, clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAM = [sys.executable, "-m", "pyvhost_user.cli.net"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROGRAM, *args], capture_output=True, text=True, timeout=timeout)


def test_print_capabilities_matches_the_backend_descriptor():
    result = run("--print-capabilities", "--mac", "not-a-mac")  # other options ignored
    assert result.returncode == 0
    caps = json.loads(result.stdout)
    assert caps["type"] == "net"
    descriptor = json.loads((REPO / "qemu" / "50-pyvhost-user-net.json").read_text())
    assert descriptor["type"] == caps["type"]
    assert Path(descriptor["binary"]).name == "vhost-user-net"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--switch", "SW"], 2, "one of --socket-path or --fd is required"),
        (["--socket-path", "s.sock"], 2, "one of --switch or --tap is required"),
        (["--socket-path", "s.sock", "--switch", "SW", "--tap", "t0"], 2, "not allowed with"),
        (["--socket-path", "s.sock", "--switch", "SW", "--mac", "zz"], 2, "is not a MAC address"),
        (["--socket-path", "s.sock", "--switch", "SW", "--mtu", "10"], 2, "--mtu 10 is not in 68..65535"),
        (["--socket-path", "s.sock", "--switch", "SW", "--queue-pairs", "0"], 2,
         "--queue-pairs 0 is not in 1..32768"),
        (["--socket-path", "s.sock", "--switch", "SW"], 1, "cannot attach to the network"),
    ],
)
def test_bad_command_lines_fail_early_with_a_clear_message(tmp_path, args, code, message):
    args = [a.replace("s.sock", str(tmp_path / "s.sock")).replace("SW", str(tmp_path / "no-switch.sock"))
            for a in args]
    result = run(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "s.sock").exists()  # nothing listening was left behind
