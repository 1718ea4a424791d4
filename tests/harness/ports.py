"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The port is found by binding port 0 and closing the socket again. No port is
    returned twice in one process, so two servers of one test run never collide,
    and a server restarted by a later test never meets a stale listener of an
    earlier one (pymilter, for one, needs seconds to let go of its port).
    """
    with _lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no fresh free port found on {host}")
