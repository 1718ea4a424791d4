"""Free TCP ports on the loopback interface, and reading a server's answer on one."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

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


def listen_inode(port: int, host: str = "127.0.0.1") -> str | None:
    """The socket inode of the listener on ``host``:``port`` (IPv4), read from
    /proc/net/tcp (no connection is made: to Postfix, a connection would start an smtpd
    and its milter session)."""
    packed = socket.inet_aton(host)
    want = f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[1] == want and fields[3] == "0A":
            return fields[9]
    return None


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host``:``port``, without connecting to it."""
    return listen_inode(port, host) is not None


def accepts(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:``port`` succeeds (it is closed at once)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def read_until(conn: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """What ``conn`` receives until ``done`` says the answer is whole (it is handed all
    received so far), or until the server closes: then what came before."""
    received = b""
    while not done(received):
        chunk = conn.recv(4096)
        if not chunk:
            break
        received += chunk
    return received
