"""A throwaway ``redis-server`` (Debian's package) on a free loopback port, with its own
configuration in a temp dir and no persistence; stopped, and started again on the same
port, as a test needs (Redis down and back)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tests.harness.lifecycle import forget_at_exit, stop_at_exit
from tests.harness.ports import accepts, free_port, read_until
from tests.harness.process import ManagedProcess
from tests.harness.waiting import wait_for


def redis_server_binary() -> str | None:
    """The ``redis-server`` program, if it is installed (``./dev deps`` installs it)."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


class RedisServer(ManagedProcess):
    """``redis-server`` on 127.0.0.1:``port``, its config, log and working directory in
    ``workdir``: ``--save ''`` and ``--appendonly no`` (nothing is written to disk, so a
    restart starts empty, as after a real crash of a cache-only Redis)."""

    def __init__(self, workdir: Path, *, port: int | None = None, name: str = "redis") -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed: run ./dev deps")
        self.port = port if port is not None else free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "redis.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode yes\n"
            f"dir {self.dir}\n"
            "daemonize no\n"
            "loglevel notice\n"
        )
        super().__init__(
            [binary, str(config), "--save", "", "--appendonly", "no"],
            self.dir / "redis.log",
            what=f"redis-server on port {self.port}",
            ready=self._ready,
            cwd=self.dir,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ready(self) -> bool:
        return accepts(self.port) and self.command("PING") == "+PONG"

    def start(self) -> None:
        stop_at_exit(self)
        super().start()

    def stop(self) -> None:
        super().stop()
        forget_at_exit(self)
        # Every client connection is gone with the process: wait for the port to be free.
        wait_for(lambda: not accepts(self.port), 10.0, what=f"port {self.port} to close")

    def _first_line(self, *args: str) -> str:
        """One command in RESP over a plain socket (no client library): the first reply
        line. Raises ``OSError`` when the server cannot be reached."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as conn:
            conn.sendall(request.encode())
            reply = read_until(conn, lambda received: b"\r\n" in received)
        return reply.decode(errors="replace").split("\r\n", 1)[0]

    def command(self, *args: str) -> str:
        """One command: the first reply line, e.g. ``+PONG``, ``:3``; empty when the
        server cannot be reached."""
        try:
            return self._first_line(*args)
        except OSError:
            return ""

    def keys(self, pattern: str = "*") -> int:
        """How many keys match ``pattern`` (a test-sized key space: ``KEYS`` is fine)."""
        first = self._first_line("KEYS", pattern)
        return int(first[1:]) if first.startswith("*") else 0
