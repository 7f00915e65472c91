"""Free loopback ports for the servers tests start (moto, Ray nodes, the app).

Importable as ``from ports import free_ports`` from any test module: pytest puts ``tests/`` on
``sys.path`` for the root conftest.py, as it does for ``conftest_train``.
"""

from __future__ import annotations

import socket


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all bound at once, so never equal)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
