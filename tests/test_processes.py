"""`processes.free_port`: the ports handed to Ray, HAProxy and test servers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from serve_app.ops import processes


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_ports_are_below_the_ephemeral_range_and_above_ray_worker_ports() -> None:
    """A port from the ephemeral range can be taken by any outgoing connection or port-0
    listener between our check and Ray binding it (seen in CI: Ray's proxy failed to bind)."""
    low, _ = ephemeral_range()
    ports = [processes.free_port() for _ in range(50)]
    assert all(20000 <= port < low for port in ports), ports
    assert len(set(ports)) == len(ports), "a port was handed out twice"


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))  # not from free_port, which would remember it
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_someone_listens_on_is_skipped(listening: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    def choose(start: int, stop: int) -> int:
        tried.append(listening if not tried else start + 7)
        return tried[-1]

    monkeypatch.setattr(processes.random, "randrange", choose)
    assert processes.free_port() == tried[1] != listening
    assert tried[0] == listening
