"""A throwaway ``redis-server`` (Debian's package) on a free loopback port, with its own
configuration in a temp dir and no persistence; stopped, and started again on the same
port, as a test needs (Redis down and back). With ``tls_names``, it speaks TLS only,
with a certificate for those names from the test CA (tlsutil.py)."""

from __future__ import annotations

import shutil
import socket
import ssl
from pathlib import Path

from tests.harness.lifecycle import forget_at_exit, stop_at_exit
from tests.harness.ports import accepts, free_port, read_until
from tests.harness.process import ManagedProcess
from tests.harness.tlsutil import certificate_authority
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

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        name: str = "redis",
        tls_names: tuple[str, ...] = (),
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed: run ./dev deps")
        self.port = port if port is not None else free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = bool(tls_names)
        self.ca_file = self.dir / "ca.pem"
        listen = f"port {self.port}\n"
        if tls_names:
            ca = certificate_authority()
            ca.cert_pem.write_to_path(str(self.ca_file))
            leaf = ca.issue_cert(*tls_names)
            leaf.private_key_pem.write_to_path(str(self.dir / "key.pem"))
            leaf.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
            listen = (
                f"port 0\ntls-port {self.port}\ntls-cert-file {self.dir}/cert.pem\n"
                f"tls-key-file {self.dir}/key.pem\ntls-ca-cert-file {self.ca_file}\n"
                "tls-auth-clients no\n"
            )
        config = self.dir / "redis.conf"
        config.write_text(
            listen + "bind 127.0.0.1\n"
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
        """The URL a client uses; with TLS, to ``localhost``, trusting the test CA."""
        if self.tls:
            return f"rediss://localhost:{self.port}/0?ssl_ca_certs={self.ca_file}"
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
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as plain:
            conn = plain
            if self.tls:  # whatever name the certificate has: the test CA is enough here
                context = ssl.create_default_context(cafile=str(self.ca_file))
                context.check_hostname = False
                conn = context.wrap_socket(plain)
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
