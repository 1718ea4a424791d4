"""A scripted SMTP server on 127.0.0.1 for the probe tests, on the test's own event loop.

Raw asyncio streams (not aiosmtpd), so that it can misbehave as a test needs: stay
silent, hang up, answer any code at any stage, delay a reply, close after a reply,
offer STARTTLS and complete a real handshake or break it. It records every line exactly
as received (bytes, split at LF only, so a smuggled bare LF shows up as a line of its
own), per connection, with whether the line arrived over TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from callahead.routes import Nexthop

TLS_GARBAGE = b"this is not a TLS server hello\r\n" * 4


def verb_of(line: str) -> str:
    return line.split(" ", 1)[0].split(":", 1)[0].upper()


def decode(raw: bytes) -> str:
    """A received line as text, without its line end."""
    return raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "surrogateescape")


@dataclass
class Conn:
    """One connection as the server saw it."""

    number: int
    raw: list[bytes] = field(default_factory=list)
    """Every line as received, line end included."""
    over_tls: list[bool] = field(default_factory=list)
    """For each line: did it arrive over TLS?"""
    rcpts: int = 0
    closed: bool = False
    encrypted: bool = False

    @property
    def lines(self) -> list[str]:
        return [decode(r) for r in self.raw]

    def verbs(self) -> list[str]:
        return [verb_of(line) for line in self.lines]


RcptHook = Callable[[Conn, str], int | str | None]
"""Called for each RCPT with the connection and the address: a reply code, a whole
reply line (``"554 5.7.1 <>: Sender address rejected"``), or None to hang up without a
reply. Returning the script's default is the hook's business."""


@dataclass
class Script:
    """How the fake primary answers: a reply code per stage, and misbehaviour."""

    banner: int = 220
    ehlo: int = 250
    helo: int = 250
    mail: int = 250
    mail_by_sender: dict[str, int] = field(default_factory=dict)
    """MAIL FROM reply codes per sender (the text inside ``<>``); others get ``mail``."""
    rcpt: int = 250
    users: dict[str, int] = field(default_factory=dict)
    """Per-address RCPT reply codes (exact match); others get ``rcpt``."""
    postmaster: int | None = 250
    """RCPT reply for postmaster@ any domain (RFC 5321 4.5.1) unless ``users`` names it;
    None: answered like any other address."""
    extensions: tuple[str, ...] = ("8BITMIME",)
    greet: bool = True
    """False: accept the connection and never say a word."""
    hang_up: bool = False
    """True: accept the connection and close it at once, without a banner."""
    close_after: str | None = None
    """Verb (``MAIL``, ``RCPT``…) after which the server hangs up instead of replying."""
    close_after_rcpt_reply: bool = False
    """Answer RCPT, then hang up (a server that closes sessions between probes)."""
    delay: dict[str, float] = field(default_factory=dict)
    """Seconds to wait before the reply, per verb (``BANNER`` for the greeting)."""
    starttls: int = 220
    tls_broken: bool = False
    """After ``220`` to STARTTLS, send garbage instead of a TLS handshake and hang up."""
    rcpt_hook: RcptHook | None = None


class FakeSmtpServer:
    """A line-based SMTP server on 127.0.0.1 that records what it receives."""

    def __init__(
        self, script: Script | None = None, *, tls_context: ssl.SSLContext | None = None
    ) -> None:
        self.script = script if script is not None else Script()
        self.tls_context = tls_context
        self.conns: list[Conn] = []
        self.lines: list[str] = []
        """Every line received, over all connections, in order, without line ends."""
        self.raw: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def hop(self) -> Nexthop:
        return Nexthop("127.0.0.1", self.port)

    @property
    def connections(self) -> int:
        return len(self.conns)

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self.conns if not c.closed)

    def verbs(self) -> list[str]:
        return [verb_of(line) for line in self.lines]

    def count(self, verb: str) -> int:
        return self.verbs().count(verb.upper())

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and hang up on every open connection."""
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def restart(self) -> None:
        """Hang up on everyone and listen again on the same port."""
        port = self.port
        await self.close()
        await wait_until(lambda: self.open_connections == 0)
        await self.start(port)

    async def _reply(self, writer: asyncio.StreamWriter, verb: str, text: str) -> None:
        delay = self.script.delay.get(verb)
        if delay:
            await asyncio.sleep(delay)
        writer.write(text.encode("utf-8"))
        await writer.drain()

    def _ehlo_reply(self, conn: Conn) -> str:
        s = self.script
        if not 200 <= s.ehlo < 300:
            return f"{s.ehlo} EHLO not here\r\n"
        keywords = [e for e in s.extensions if not (conn.encrypted and e.upper() == "STARTTLS")]
        lines = [f"{s.ehlo}-fake.test hello", *(f"{s.ehlo}-{k}" for k in keywords)]
        lines[-1] = lines[-1][:3] + " " + lines[-1][4:]
        return "".join(line + "\r\n" for line in lines)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns) + 1)
        self.conns.append(conn)
        self._writers.add(writer)
        s = self.script
        try:
            if s.hang_up:
                return
            if not s.greet:
                while raw := await reader.readline():  # until the client gives up
                    self._record(conn, raw)
                return
            await self._reply(writer, "BANNER", f"{s.banner} fake.test ESMTP banner\r\n")
            if s.banner == 421:
                return
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = self._record(conn, raw)
                verb = verb_of(line)
                if verb == s.close_after:
                    return
                if verb == "EHLO":
                    text = self._ehlo_reply(conn)
                elif verb == "QUIT":
                    await self._reply(writer, verb, "221 2.0.0 bye\r\n")
                    return
                elif verb == "RCPT":
                    conn.rcpts += 1
                    address = line[len("RCPT TO:<") :].removesuffix(">")
                    code: int | str | None = s.users.get(address, s.rcpt)
                    if (
                        s.postmaster is not None
                        and address not in s.users
                        and address.lower().startswith("postmaster@")
                    ):
                        code = s.postmaster
                    if s.rcpt_hook is not None:
                        code = s.rcpt_hook(conn, address)
                    if code is None:
                        return
                    reply = code if isinstance(code, str) else f"{code} fake reply to RCPT"
                    await self._reply(writer, verb, reply + "\r\n")
                    if reply.startswith("421") or s.close_after_rcpt_reply:
                        return
                    continue
                elif verb == "STARTTLS":
                    if await self._starttls(conn, writer):
                        return
                    continue
                else:
                    code = {"HELO": s.helo, "MAIL": s.mail}.get(verb, 502)
                    if verb == "MAIL":
                        sender = line.partition("<")[2].partition(">")[0]
                        code = s.mail_by_sender.get(sender, code)
                    text = f"{code} fake reply to {verb}\r\n"
                await self._reply(writer, verb, text)
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            conn.closed = True
            self._writers.discard(writer)
            writer.close()

    def _record(self, conn: Conn, raw: bytes) -> str:
        conn.raw.append(raw)
        conn.over_tls.append(conn.encrypted)
        self.raw.append(raw)
        line = decode(raw)
        self.lines.append(line)
        return line

    async def _starttls(self, conn: Conn, writer: asyncio.StreamWriter) -> bool:
        """Answer STARTTLS; True when the connection is to be closed."""
        s = self.script
        offered = any(e.upper() == "STARTTLS" for e in s.extensions)
        if conn.encrypted or not offered or self.tls_context is None:
            await self._reply(writer, "STARTTLS", "502 5.5.1 not implemented\r\n")
            return False
        await self._reply(writer, "STARTTLS", f"{s.starttls} go ahead\r\n")
        if s.starttls != 220:
            return False
        if s.tls_broken:
            writer.write(TLS_GARBAGE)
            await writer.drain()
            return True
        await writer.start_tls(self.tls_context)
        conn.encrypted = writer.get_extra_info("ssl_object") is not None
        return False


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def wait_until(
    condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
) -> float:
    """Wait until ``condition()`` holds; returns the seconds waited. Fails the test when
    it does not hold within ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - started
