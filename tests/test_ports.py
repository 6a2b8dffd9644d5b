"""Free loopback ports for the daemons a backend starts (launcher/backends/commands.py)."""

from __future__ import annotations

from launcher.backends.commands import free_ports


def test_ports_picked_together_are_distinct() -> None:
    """A private Ray head takes seven ports at once. Picked one by one, each released before the
    next, 600 ports repeated one in nearly every try here; picked together they never may."""
    ports = free_ports(600)
    assert len(set(ports)) == len(ports) == 600
    assert all(1024 <= port <= 65535 for port in ports)
