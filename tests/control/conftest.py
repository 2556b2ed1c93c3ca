"""A fake ``ControlTarget``, a started ``ControlServer`` on it, and a line client.

Nothing here sleeps: readers wait on their socket with a timeout.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvhost_user.control.server import ControlServer
from pyvhost_user.control.target import ControlError, Event

WAIT = 10.0  # seconds any single wait may take before the test fails


class FakeTarget:
    """Two ASIDs (0: identity, passthrough; 1: empty default, two mappings), one group."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []
        self.listeners: list[Callable[[Event], None]] = []
        self.mappings: dict[int, list[dict[str, Any]]] = {
            0: [],
            1: [
                {"iova": 0x1000, "size": 0x1000, "uaddr": 0x7F0000001000, "perm": 3},
                {"iova": 0x10000, "size": 0x200000, "uaddr": 0x7F0000100000, "perm": 1},
            ],
        }
        self.defaults = {0: "identity", 1: "empty"}

    # -- ControlTarget ---------------------------------------------------------
    def query_address_spaces(self, *, entries: bool = False) -> list[dict[str, Any]]:
        self.calls.append(("query_address_spaces", entries))
        spaces = []
        for asid, maps in self.mappings.items():
            space = {
                "asid": asid,
                "default": self.defaults[asid],
                "state": "passthrough" if asid == 0 else ("mapped" if maps else "empty"),
                "entries": len(maps),
                "mapped_bytes": sum(m["size"] for m in maps),
                "groups": [0] if asid == 0 else [],
                "touched": asid == 1,
            }
            if entries:
                space["mappings"] = [dict(m) for m in maps]
            spaces.append(space)
        return spaces

    def query_groups(self) -> list[dict[str, Any]]:
        self.calls.append(("query_groups", None))
        return [{"group": 0, "asid": 0, "queues": [0, 1]}]

    def reset_map(self, asid: int) -> dict[str, Any]:
        self.calls.append(("reset_map", asid))
        if asid == 99:
            raise RuntimeError("the fake target has a bug")
        if asid not in self.mappings:
            raise ControlError(f"no address space {asid} (the device has 2)", "InvalidParameter")
        dropped = self.mappings[asid]
        self.mappings[asid] = []
        result = {
            "asid": asid,
            "entries_dropped": len(dropped),
            "bytes_unmapped": sum(m["size"] for m in dropped),
        }
        self.emit({"event": "RESET_MAP", "data": dict(result)})
        return result

    def query_stats(self) -> dict[str, Any]:
        self.calls.append(("query_stats", None))
        return {"translations": 1234, "misses": 2, "iotlb_updates": 2, "reset_maps": 0}

    def query_status(self) -> dict[str, Any]:
        self.calls.append(("query_status", None))
        return {
            "device": "virtio-blk",
            "front_end_connected": True,
            "features": (1 << 32) | (1 << 33),
            "status": 15,
            "iotlb_persist": "negotiated",
            "persist_active": True,
        }

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        with self.lock:
            self.listeners.append(listener)

        def unsubscribe() -> None:
            with self.lock:
                self.listeners.remove(listener)

        return unsubscribe

    # -- test side -----------------------------------------------------------------
    def emit(self, event: Event) -> None:
        with self.lock:
            listeners = list(self.listeners)
        for listener in listeners:
            listener(event)


class LineClient:
    """A raw client: send bytes, read JSON lines, each read bounded by ``WAIT``."""

    def __init__(self, path: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def execute(self, command: str, arguments: dict | None = None, request_id: Any = None) -> None:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        if request_id is not None:
            request["id"] = request_id
        self.send(json.dumps(request) + "\n")

    def read_line(self) -> bytes | None:
        """One line, or None at end of stream (ECONNRESET counts as the end)."""
        while b"\n" not in self.buffer:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def read(self) -> dict[str, Any]:
        line = self.read_line()
        assert line is not None, "connection closed while a message was expected"
        return json.loads(line)

    def call(self, command: str, arguments: dict | None = None, request_id: Any = None) -> dict:
        self.execute(command, arguments, request_id)
        return self.read()

    def negotiate(self) -> dict[str, Any]:
        greeting = self.read()
        assert "pyvhost-user" in greeting
        assert self.call("qmp_capabilities") == {"return": {}}
        return greeting

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def server_factory(sock_dir: Path, target: FakeTarget) -> Iterator[Callable[..., ControlServer]]:
    servers: list[ControlServer] = []

    def make(name: str = "control.sock", **options: Any) -> ControlServer:
        server = ControlServer(sock_dir / name, options.pop("target", target), **options)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(server_factory) -> ControlServer:
    return server_factory()


@pytest.fixture
def connect() -> Iterator[Callable[..., LineClient]]:
    """``connect(path, negotiate=True)``: a LineClient, closed after the test."""
    clients: list[LineClient] = []

    def make(path: Path | str, negotiate: bool = True) -> LineClient:
        client = LineClient(path)
        clients.append(client)
        if negotiate:
            client.negotiate()
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client_factory(server: ControlServer, connect) -> Callable[..., LineClient]:
    return lambda negotiate=True: connect(server.path, negotiate)


@pytest.fixture
def client(client_factory) -> LineClient:
    return client_factory()
