"""The vhost-user-blk program: conventions of QEMU's vhost-user.rst, clear refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAM = [sys.executable, "-m", "pyvhost_user.cli.blk"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROGRAM, *args], capture_output=True, text=True, timeout=timeout)


def test_print_capabilities_is_the_json_vhost_user_json_describes():
    result = run("--print-capabilities", "--image", "/nonexistent")  # other options ignored
    assert result.returncode == 0
    caps = json.loads(result.stdout)
    assert caps["type"] == "block"
    assert set(caps["features"]) <= {"read-only", "blk-file"}


def test_backend_descriptor_agrees_with_print_capabilities():
    descriptor = json.loads((REPO / "qemu" / "50-pyvhost-user-blk.json").read_text())
    caps = json.loads(run("--print-capabilities").stdout)
    assert descriptor["type"] == caps["type"]
    assert Path(descriptor["binary"]).name == "vhost-user-blk"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--image", "x.img"], 2, "one of --socket-path or --fd is required"),
        (["--socket-path", "s.sock"], 2, "--image (or --blk-file) is required"),
        (["--socket-path", "s.sock", "--image", "/nonexistent/x.img"], 1, "cannot open image"),
        (["--socket-path", "s.sock", "--fd", "3"], 2, "not allowed with"),
        (["--socket-path", "s.sock", "--image", "IMG", "--num-queues", "0"], 1, "not in 1..64"),
    ],
)
def test_bad_command_lines_fail_early_with_a_clear_message(tmp_path, args, code, message):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    args = [a.replace("IMG", str(image)).replace("s.sock", str(tmp_path / "s.sock")) for a in args]
    result = run(*args)
    assert result.returncode == code
    assert message in result.stderr


def test_socket_in_use_is_refused(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    path = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(path))
    holder.listen(1)
    try:
        result = run("--socket-path", str(path), "--image", str(image))
        assert result.returncode == 1 and "in use by another process" in result.stderr
    finally:
        holder.close()


def test_inherited_listening_fd_is_served(tmp_path):
    """--fd with a listening socket (how qemu-storage-daemon's addr.type=fd and
    management layers hand a socket over)."""
    from pyvhost_user.frontend import BlkDriver

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    process = subprocess.Popen(
        [*PROGRAM, "--fd", str(listener.fileno()), "--image", str(image)],
        pass_fds=[listener.fileno()], stderr=subprocess.PIPE, text=True,
    )
    listener.close()
    try:
        with BlkDriver.connect(path) as driver:
            assert driver.read(0, 4096) == image.read_bytes()[:4096]
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_inherited_connected_fd_serves_that_front_end_then_exits(tmp_path):
    from pyvhost_user.frontend import BlkDriver, Frontend

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = subprocess.Popen(
        [*PROGRAM, "--fd", str(theirs.fileno()), "--image", str(image)],
        pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True,
    )
    theirs.close()
    driver = BlkDriver(Frontend(ours))
    driver.start()
    assert driver.read(8, 4096) == image.read_bytes()[4096:8192]
    driver.close()
    _, err = process.communicate(timeout=30)  # the only front-end left: the program ends
    assert process.returncode == 0, err


def test_socket_is_private_by_default_and_can_be_given_to_a_group(tmp_path):
    import grp
    import stat as stat_module

    from pyvhost_user.launch.backends import start_backend

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    private = start_backend("pyvhost", image, tmp_path / "p.sock")
    shared = start_backend("pyvhost", image, tmp_path / "g.sock",
                           extra_args=("--socket-mode", "660", "--socket-group", "root"))
    try:
        assert stat_module.S_IMODE(os.stat(private.socket_path).st_mode) == 0o600
        st = os.stat(shared.socket_path)
        assert stat_module.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam("root").gr_gid
    finally:
        assert private.stop() == 0 and shared.stop() == 0


def test_unknown_socket_group_is_refused(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    result = run("--socket-path", str(tmp_path / "s.sock"), "--image", str(image),
                 "--socket-group", "no-such-group-pvu")
    assert result.returncode == 1 and "does not exist" in result.stderr
