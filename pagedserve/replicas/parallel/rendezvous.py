"""A fresh rendezvous address for one replica's tensor-parallel group (no torch here).

Every replica has its own group with its own rendezvous address: rank 0's host picks a free
port when the replica starts, so two tensor-parallel replicas on one node never collide.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, chosen by the OS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_address(host: str = "127.0.0.1") -> str:
    """A fresh `tcp://host:port` for one replica's group."""
    return f"tcp://{host}:{free_port(host)}"
