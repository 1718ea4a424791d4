"""Redis behind Sentinel, from Debian's packages, on free loopback ports: one master, one
replica and three sentinels (``redis-server CONF --sentinel``), each with its own
configuration in a temp dir and no persistence. Passwords on the data nodes and on the
sentinels, as a site has them. The sentinels know each other and the replica from their
configuration (fixed run ids), so the set is ready at once, and they fail over quickly
(``down-after-milliseconds`` 1000); ``kill_master`` sends SIGKILL."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import BinaryIO

from tests.harness.lifecycle import StartStop, forget_at_exit, stop_at_exit
from tests.harness.ports import accepts, free_port
from tests.harness.process import ManagedProcess
from tests.harness.redis import redis_server_binary
from tests.harness.waiting import wait_for

SERVICE = "callahead"
DATA_PASSWORD = "data-S3cret"
SENTINEL_PASSWORD = "sentinel-S3cret"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000

Reply = str | int | list["Reply"] | None


def _read(stream: BinaryIO) -> Reply:
    """One RESP2 reply from a buffered socket file (errors as ``-ERR ...`` text)."""
    line: bytes = stream.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2].decode(errors="replace")
    if kind in (b"+", b"-"):
        return rest if kind == b"+" else "-" + rest
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read(stream) for _ in range(size)]
    raise OSError(f"not a RESP reply: {line!r}")


def ask(port: int, password: str, *args: str) -> Reply:
    """``args`` as one command to 127.0.0.1:``port`` after ``AUTH password``; raises
    ``OSError`` when it cannot be reached."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as conn:
        stream = conn.makefile("rb")
        commands = [("AUTH", password), args] if password else [args]
        for command in commands:
            conn.sendall(
                (
                    f"*{len(command)}\r\n"
                    + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in command)
                ).encode()
            )
        replies = [_read(stream) for _ in commands]
    return replies[-1]


def _quiet(port: int, password: str, *args: str) -> Reply:
    try:
        return ask(port, password, *args)
    except OSError:
        return None


class Node(ManagedProcess):
    """One ``redis-server`` (a data node, or with ``sentinel`` a sentinel)."""

    def __init__(
        self, workdir: Path, name: str, port: int, body: str, *, password: str, sentinel: bool
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed: run ./dev deps")
        self.port = port
        self.password = password
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "redis.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\ndaemonize no\nloglevel notice\n" + body
        )
        extra = ["--sentinel"] if sentinel else ["--save", "", "--appendonly", "no"]
        super().__init__(
            [binary, str(config), *extra],
            self.dir / "redis.log",
            what=f"redis-server {name} on port {port}",
            ready=lambda: accepts(port) and _quiet(port, password, "PING") == "PONG",
            cwd=self.dir,
        )

    def start(self) -> None:
        stop_at_exit(self)
        super().start()

    def stop(self) -> None:
        super().stop()
        forget_at_exit(self)

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to clients or sentinels."""
        if self.pid is not None and not self.exited():
            os.kill(self.pid, signal.SIGKILL)
        wait_for(self.exited, 10.0, what=f"redis on port {self.port} to die")
        wait_for(lambda: not accepts(self.port), 10.0, what=f"port {self.port} to close")

    def ask(self, *args: str) -> Reply:
        return ask(self.port, self.password, *args)

    def role(self) -> str:
        reply = _quiet(self.port, self.password, "ROLE")
        return str(reply[0]) if isinstance(reply, list) and reply else ""


class SentinelSet(StartStop):
    """A master, its replica and three sentinels watching it as ``SERVICE``;
    ``passwords``: ``DATA_PASSWORD`` on the data nodes, ``SENTINEL_PASSWORD`` on the
    sentinels (else none)."""

    def __init__(self, workdir: Path, *, passwords: bool = True) -> None:
        self.data_password = DATA_PASSWORD if passwords else ""
        self.sentinel_password = SENTINEL_PASSWORD if passwords else ""
        data_ports = [free_port(), free_port()]
        sentinel_ports = [free_port() for _ in range(3)]
        auth = (
            f"requirepass {self.data_password}\nmasterauth {self.data_password}\n"
            if passwords
            else ""
        )
        auth += "repl-diskless-sync-delay 0\n"  # the replica syncs at once, not after 5 s
        self.master = Node(
            workdir, "master", data_ports[0], auth, password=self.data_password, sentinel=False
        )
        self.replica = Node(
            workdir,
            "replica",
            data_ports[1],
            auth + f"replicaof 127.0.0.1 {data_ports[0]}\n",
            password=self.data_password,
            sentinel=False,
        )
        ids = [secrets.token_hex(20) for _ in sentinel_ports]
        self.sentinels = []
        for n, port in enumerate(sentinel_ports):
            body = (
                f"sentinel myid {ids[n]}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {data_ports[0]} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel known-replica {SERVICE} 127.0.0.1 {data_ports[1]}\n"
            )
            body += "".join(
                f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other} {ids[m]}\n"
                for m, other in enumerate(sentinel_ports)
                if m != n
            )
            if passwords:
                body += (
                    f"sentinel auth-pass {SERVICE} {self.data_password}\n"
                    f"requirepass {self.sentinel_password}\n"
                    f"sentinel sentinel-pass {self.sentinel_password}\n"
                )
            self.sentinels.append(
                Node(
                    workdir,
                    f"sentinel{n + 1}",
                    port,
                    body,
                    password=self.sentinel_password,
                    sentinel=True,
                )
            )

    @property
    def nodes(self) -> list[Node]:
        return [self.master, self.replica, *self.sentinels]

    @property
    def addresses(self) -> str:
        """``CALLAHEAD_REDIS_SENTINELS``'s value."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """The callahead variables for this set."""
        env = {"CALLAHEAD_REDIS_SENTINELS": self.addresses, "CALLAHEAD_REDIS_SERVICE": SERVICE}
        if self.data_password:
            env["CALLAHEAD_REDIS_PASSWORD"] = self.data_password
        if self.sentinel_password:
            env["CALLAHEAD_REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.start()
            wait_for(self._replicating, 20.0, what="the replica to sync with the master")
            for sentinel in self.sentinels:
                sentinel.start()
            wait_for(self._watching, 20.0, what="the sentinels to watch the master")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def _replicating(self) -> bool:
        info = _quiet(self.replica.port, self.data_password, "INFO", "replication")
        return isinstance(info, str) and "master_link_status:up" in info

    def _watching(self) -> bool:
        return all(self.sentinel_view(s) == self.master.port for s in self.sentinels)

    def sentinel_view(self, sentinel: Node) -> int | None:
        """The master's port as ``sentinel`` names it (None: it names none)."""
        reply = _quiet(
            sentinel.port, self.sentinel_password, "SENTINEL", "get-master-addr-by-name", SERVICE
        )
        if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], str):
            return int(reply[1])
        return None

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            port = self.sentinel_view(sentinel)
            if port is not None:
                return port
        return None

    def has_key(self, key: str) -> bool:
        """``key`` is on a data node that answers (the master, or after a failover the
        promoted replica; a replica gets it moments after its master)."""
        return any(_quiet(n.port, self.data_password, "EXISTS", key) == 1 for n in self.nodes[:2])

    def kill_master(self) -> None:
        self.master.kill()

    def wait_failover(self, timeout: float = 30.0) -> float:
        """Until every sentinel names the replica and the replica is a master; the
        seconds waited."""
        started = time.monotonic()
        wait_for(
            lambda: (
                all(self.sentinel_view(s) == self.replica.port for s in self.sentinels)
                and self.replica.role() == "master"
            ),
            timeout,
            interval=0.01,
            what="the sentinels to promote the replica",
        )
        return time.monotonic() - started
