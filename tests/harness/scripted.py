"""The scripted SMTP server of the harness: the primary of the probe unit tests and of
the fault-matrix integration tests.

``ScriptedServer`` is a small SMTP server on 127.0.0.1 written on raw asyncio streams
(not aiosmtpd), so that it can misbehave in any way a test needs: stay silent, hang up
before the banner, greet with 421 or 554, reject EHLO, MAIL (per sender) or RCPT, answer
any command late, hang up instead of answering a command or right after answering it,
let a hook decide each RCPT (or hang up), offer STARTTLS and then break the handshake,
count errors and hang up like Postfix's ``smtpd_hard_error_limit``, or slow down like
``smtpd_soft_error_limit``.

What it does is read from a ``Script`` (whole reply lines, as a real server sends them)
at every step, so a test can change it while sessions are open
(``server.update(delay={"RCPT": 5.0})``). It also accepts real deliveries (MAIL, RCPT,
DATA with dot-stuffing removed), so a Postfix backup can deliver to it.

It records every command line exactly as received (``Command.raw``: the bytes, split
at LF only, so that a bare LF smuggled into a command shows up as a line of its own),
whether it arrived over TLS, whether it was pipelined (sent before the reply to the
command before it), and the reply it got: over all sessions in order
(``commands``, ``lines``, ``count``) and per connection (``sessions``, with whether the
connection is closed yet); and every message (``messages``, ``mailbox``). Each line is
recorded before it is answered, so a client that has its reply finds it recorded.

Like ``tests.harness.primary.Primary`` it is a ``tests.harness.threaded.ThreadedServer``:
it runs its own loop in its own thread (start and stop are plain calls, from a
synchronous test or from an async one on a loop of its own), can be stopped and started
again on the same port, and aborts every open connection when stopped. Tests get it from
the ``scripted`` fixture (``tests.harness.fixtures``), which stops it after the test.

Behaviour not spelled out by the ``Script`` fields, modelled on Postfix:

- A banner starting with ``421`` is sent and the connection closed. Any other non-2xx
  banner (``554 ...``) is sent and then every command but QUIT gets
  ``503 5.5.1 Error: bad sequence of commands`` (RFC 5321 section 3.1).
- MAIL before a successful HELO/EHLO gets ``503 5.5.1 Error: send HELO/EHLO first``;
  a second MAIL ``503 5.5.1 Error: nested MAIL command``; RCPT without an accepted MAIL
  ``503 5.5.1 Error: need MAIL command``; DATA without MAIL
  ``503 5.5.1 Error: need RCPT command`` and without an accepted RCPT
  ``554 5.5.1 Error: no valid recipients``.
- STARTTLS when not advertised, or once TLS is on: ``502 5.5.1 Error: command not
  implemented``; before EHLO: ``503 5.5.1 Error: send EHLO first``. After the
  handshake the session starts over (EHLO needed again) and STARTTLS is no longer
  advertised.
- Every 4xx/5xx reply counts as an error, these ones included; a message accepted at
  the end of DATA resets the count (as in Postfix).
- A ``421`` reply to any command is sent and the connection closed.
- A command's ``delay`` comes before anything else, ``hang_up_at`` included.
- A reply string with ``\\n`` in it is sent as a multiline reply (``250-a``/``250 b``).
- The ``421`` sent on reaching ``max_errors`` is not recorded in ``commands`` (it
  answers no command); the final ``.`` of DATA is, with the reply to the message.
- ``tls="broken"`` waits for the client's first TLS bytes, then sends non-TLS bytes and
  a FIN: the client's handshake fails with ``ssl.SSLError`` (wrong version number).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.harness.threaded import ThreadedServer
from tests.harness.tlsutil import server_context

__all__ = [
    "HOSTNAME",
    "Command",
    "Delivery",
    "RcptHook",
    "Script",
    "ScriptedServer",
    "Session",
    "exim_without_postmaster",
    "path_of",
]

HOSTNAME = "scripted.test"
LINE_LIMIT = 1 << 20  # longest line (command or message line) read, in bytes

NOOP_OK = "250 2.0.0 Ok"
QUIT_OK = "221 2.0.0 Bye"
DATA_END_OK = "250 2.0.0 Ok: queued"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
UNKNOWN_COMMAND = "502 5.5.2 Error: command not recognized"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
BAD_SEQUENCE = "503 5.5.1 Error: bad sequence of commands"
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_EHLO = "503 5.5.1 Error: send EHLO first"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NO_VALID_RCPT = "554 5.5.1 Error: no valid recipients"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available due to local problem"
BROKEN_TLS_LINGER = 10.0  # seconds to wait for the client to hang up
TLS_GARBAGE = b"this is not a TLS server hello\r\n" * 4


@dataclass
class Script:
    """What the server answers. Read afresh at every step of every session.

    Change it through ``ScriptedServer.update(**changes)``, which replaces fields under
    the server's lock; plain attribute assignment on ``server.script`` works too.
    """

    banner: str | None = f"220 {HOSTNAME} ESMTP"
    """Greeting; ``None``: accept TCP and never send anything (commands are still
    read and recorded, with reply ``None``)."""
    delay: dict[str, float] = field(default_factory=dict)
    """Seconds to wait before answering, per verb in upper case (``"RCPT"``), with
    ``"BANNER"`` for the greeting. The script is read again after the wait."""
    hang_up_at: str | None = None
    """Verb in upper case at which the server hangs up instead of answering (after its
    ``delay``); ``"BANNER"``: right after accepting the connection, before any greeting."""
    hang_up_after: str | None = None
    """Verb in upper case after whose reply the server hangs up (a server that closes
    its sessions between probes)."""
    ehlo: str = "250"
    """First line of the EHLO reply; a bare 2xx code becomes ``250-scripted.test``.
    A 2xx reply lists ``extensions``; any other code is sent as it is, alone."""
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SMTPUTF8")
    helo: str = f"250 {HOSTNAME}"
    mail: str = "250 2.1.0 Ok"
    mail_by_sender: dict[str, str] = field(default_factory=dict)
    """Sender (the exact text inside ``<>``, ``""`` for the null sender) -> the reply to
    its MAIL FROM; others get ``mail``."""
    rcpt_default: str = "550 5.1.1 User unknown"
    users: frozenset[str] = frozenset()
    """Addresses (compared case-insensitively) answered with ``rcpt_ok``."""
    rcpt_ok: str = "250 2.1.5 Ok"
    rcpt_overrides: dict[str, str] = field(default_factory=dict)
    """Address (compared case-insensitively) -> full reply line; beats ``users``."""
    postmaster: str | None = None
    """Reply to ``postmaster@`` any domain, unless ``rcpt_overrides`` names the address;
    None (the default, as at the many real primaries without a postmaster@ mailbox):
    answered like any address."""
    rcpt_hook: RcptHook | None = None
    """Decides every RCPT instead of the fields above (see ``RcptHook``)."""
    starttls: str = "220 2.0.0 Ready to start TLS"
    tls: Literal["ok", "broken"] = "ok"
    max_errors: int | None = None
    soft_error_limit: int | None = None
    error_sleep: float = 0.0
    rset: str = "250 2.0.0 Ok"
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    data_end: str = DATA_END_OK
    """Reply after the final dot; a 2xx reply stores the message."""

    def __post_init__(self) -> None:
        if self.tls not in ("ok", "broken"):
            raise ValueError(f"tls must be 'ok' or 'broken', not {self.tls!r}")

    def rcpt_reply(self, address: str) -> str:
        """The reply this script gives to ``RCPT TO:<address>``."""
        key = address.lower()
        for addr, reply in self.rcpt_overrides.items():
            if addr.lower() == key:
                return reply
        if any(user.lower() == key for user in self.users):
            return self.rcpt_ok
        if self.postmaster is not None and key.startswith("postmaster@"):
            return self.postmaster
        return self.rcpt_default


def exim_without_postmaster(users: Iterable[str]) -> Script:
    """A primary with Exim's own texts and no postmaster@ accept: RCPT accepted ``250
    Accepted`` (exim src/smtp_in.c, ``smtp_user_msg(US"250", US"Accepted")``), an address
    that does not route ``550 Unrouteable address`` (exim src/route.c, ``addr->message =
    US"Unrouteable address"``), postmaster@ included; MAIL ``250 OK``; no
    ENHANCEDSTATUSCODES (Exim has none). An Exim whose ACL lost Debian's postmaster@
    accept, or any MTA that answers with bare codes and has no postmaster@."""
    return Script(
        banner="220 mx.exim.test ESMTP Exim 4.96 Mon, 07 Dec 2026 12:00:00 +0000",
        mail="250 OK",
        rcpt_ok="250 Accepted",
        rcpt_default="550 Unrouteable address",
        users=frozenset(users),
    )


_SCRIPT_FIELDS = frozenset(f.name for f in dataclasses.fields(Script))


@dataclass(frozen=True)
class Command:
    """One command line as received and the reply sent to it: ``None`` while
    unanswered, or if none was ever sent. A multiline reply is its lines joined with
    ``\\n``."""

    session: int
    raw: bytes
    """The line exactly as received, line end (LF, or whatever preceded it) included."""
    tls: bool
    """Whether the line arrived over TLS."""
    reply: str | None
    pipelined: bool = False
    """The line had arrived before the server answered the command before it: the client
    sent it without waiting for that reply (RFC 2920 pipelining)."""

    @property
    def line(self) -> str:
        """The line decoded as UTF-8 with surrogateescape, without its line end."""
        return _decode(self.raw)

    @property
    def verb(self) -> str:
        """The command's verb in upper case (``MAIL`` for ``mail from:<>``)."""
        return _verb(self.line)


class _Commands:
    """Questions about a list of commands, for the server and for one session."""

    @property
    def commands(self) -> list[Command]:
        raise NotImplementedError

    @property
    def lines(self) -> list[str]:
        """Every command line, in order, without line ends."""
        return [c.line for c in self.commands]

    @property
    def raw(self) -> list[bytes]:
        """Every command line exactly as received (``Command.raw``), in order."""
        return [c.raw for c in self.commands]

    @property
    def over_tls(self) -> list[bool]:
        """For each command line: did it arrive over TLS?"""
        return [c.tls for c in self.commands]

    def verbs(self) -> list[str]:
        """The verb of every command line, in upper case (``MAIL`` for ``mail from:``)."""
        return [c.verb for c in self.commands]

    def count(self, verb: str) -> int:
        """How many command lines start with ``verb`` (case-insensitive)."""
        return sum(1 for c in self.commands if _starts_with_verb(c.line, verb))

    def rcpt_lines(self) -> list[str]:
        """The ``RCPT`` command lines, exactly as received."""
        return [c.line for c in self.commands if _starts_with_verb(c.line, "RCPT")]

    def rcpts(self) -> list[str]:
        """The addresses of all ``RCPT`` lines (the exact text inside ``<>``), in order,
        whatever the reply."""
        return [path_of(line) for line in self.rcpt_lines()]


@dataclass(frozen=True)
class Session(_Commands):
    """One connection as the server saw it, at the time it was asked for."""

    number: int
    """1 for the server's first connection, counting on over restarts."""
    recorded: tuple[Command, ...]
    closed: bool
    """Whether the server is done with the connection (closed it or saw it closed)."""

    @property
    def commands(self) -> list[Command]:
        return list(self.recorded)


RcptHook = Callable[[Session, str], str | None]
"""Called (in the server's thread) for each RCPT that follows an accepted MAIL, with
the session so far (this RCPT included) and the address: the whole reply line to send
(``"554 5.7.1 <>: Sender address rejected: Access denied"``), or None to hang up
without a reply."""


@dataclass(frozen=True)
class Delivery:
    """One message accepted at the end of DATA. ``sender`` and ``recipients`` are the
    paths inside ``<>`` as received; ``data`` has CRLF line ends and no dot-stuffing."""

    session: int
    sender: str
    recipients: tuple[str, ...]
    data: bytes


def path_of(line: str) -> str:
    """The address in a ``MAIL FROM:``/``RCPT TO:`` line: the exact text inside ``<>``
    (a ``>`` inside a quoted local part does not end it), or without brackets the first
    word after the colon."""
    _, colon, rest = line.partition(":")
    if not colon:
        return ""
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        return rest.split(" ", 1)[0]
    quoted = escaped = False
    for index, char in enumerate(rest[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return rest[1:index]
    return rest[1:]


def _decode(raw: bytes) -> str:
    return raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "surrogateescape")


def _verb(line: str) -> str:
    return line.split(" ", 1)[0].split(":", 1)[0].upper()


def _starts_with_verb(line: str, verb: str) -> bool:
    upper, want = line.upper(), verb.upper()
    return upper.startswith(want) and (len(upper) == len(want) or not upper[len(want)].isalnum())


def _reply_lines(reply: str) -> list[str]:
    """``reply`` split into lines, all but the last marked as continued (``250-``)."""
    lines = [part.rstrip("\r") for part in reply.split("\n")]
    out: list[str] = []
    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        if not last and len(line) >= 3 and line[:3].isdigit() and line[3:4] in ("", " ", "-"):
            line = f"{line[:3]}-{line[4:]}"
        out.append(line)
    return out


def _is_error(reply: str) -> bool:
    return reply[:1] in ("4", "5")


def _is_ok(reply: str) -> bool:
    return reply[:1] == "2"


class _Close(Exception):
    """End the session: close the connection (what was written is still sent)."""


class _Protocol(asyncio.StreamReaderProtocol):
    """Stream protocol that reports its connection to the server and runs a session."""

    def __init__(self, owner: ScriptedServer) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(limit=LINE_LIMIT, loop=loop), self._serve, loop=loop)
        self._owner = owner
        self._tracked: asyncio.BaseTransport | None = None
        self._session = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._tracked is None:  # loop.start_tls does not call it again, but be sure
            self._tracked = transport
            self._session = self._owner._session_started(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_lost(self._tracked)
        super().connection_lost(exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _Dialogue(self._owner, self._session, reader, writer).run()


class _Dialogue:
    """One SMTP session; runs in the server's loop."""

    def __init__(
        self,
        owner: ScriptedServer,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._owner = owner
        self._number = number
        self._reader = reader
        self._writer = writer
        self._errors = 0
        self._rejecting = False  # non-2xx banner: only QUIT is served
        self._tls = False
        self._greeted = False
        self._sender: str | None = None  # set once MAIL was accepted
        self._recipients: list[str] = []
        self._ahead = False  # input was waiting when the last reply was sent

    async def run(self) -> None:
        try:
            await self._converse()
        except (_Close, OSError, EOFError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writer.close()
            self._owner._session_closed(self._number)

    async def _readline(self) -> bytes:
        line = await self._reader.readline()
        if not line:
            raise _Close
        return line

    async def _converse(self) -> None:
        script = await self._script_after_delay("BANNER")
        if script.hang_up_at == "BANNER":
            raise _Close
        if script.banner is None:
            while True:  # silent: record what comes until the client gives up
                self._record(await self._readline())
        await self._send(script.banner)
        if script.banner.startswith("421"):
            raise _Close
        self._rejecting = not _is_ok(script.banner)
        while True:
            raw = await self._readline()
            index = self._record(raw)
            await self._dispatch(_decode(raw), index)

    def _record(self, raw: bytes) -> int:
        ahead, self._ahead = self._ahead, False
        return self._owner._record(Command(self._number, raw, self._tls, None, ahead))

    async def _script_after_delay(self, verb: str) -> Script:
        """The script, read again after the ``delay`` it sets for ``verb``, if any."""
        script = self._owner._snapshot()
        wait = script.delay.get(verb, 0.0)
        if wait <= 0:
            return script
        await asyncio.sleep(wait)
        return self._owner._snapshot()

    # -- replies -----------------------------------------------------------------------

    async def _send(self, reply: str) -> None:
        self._writer.write(("\r\n".join(_reply_lines(reply)) + "\r\n").encode())
        await self._writer.drain()

    async def _reply(self, index: int, reply: str) -> None:
        """Answer the command recorded at ``index``, counting errors like Postfix."""
        script = self._owner._snapshot()
        await self._error_sleep(script)
        # Recorded before it is sent: a client that has read the reply must find it here.
        self._owner._set_reply(index, "\n".join(_reply_lines(reply)))
        # Bytes the client sent before it could read this reply (the stream's buffer:
        # what the loop has read from the socket so far).
        self._ahead = bool(self._reader._buffer)  # type: ignore[attr-defined]
        await self._send(reply)
        if reply.startswith("421"):
            raise _Close
        if _is_error(reply):
            self._errors += 1
            if script.max_errors is not None and self._errors >= script.max_errors:
                await self._error_sleep(script)
                await self._send(TOO_MANY_ERRORS)
                raise _Close

    async def _error_sleep(self, script: Script) -> None:
        limit = script.soft_error_limit
        if limit is not None and self._errors >= limit and script.error_sleep > 0:
            await asyncio.sleep(script.error_sleep)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []

    # -- commands ----------------------------------------------------------------------

    async def _dispatch(self, line: str, index: int) -> None:
        verb = _verb(line)
        script = await self._script_after_delay(verb)
        if verb == script.hang_up_at:
            raise _Close
        await self._answer(verb, line, index)
        if verb == script.hang_up_after:
            raise _Close

    async def _answer(self, verb: str, line: str, index: int) -> None:
        if verb == "QUIT":
            await self._reply(index, QUIT_OK)
            raise _Close
        if self._rejecting:
            await self._reply(index, BAD_SEQUENCE)
            return
        handler = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "STARTTLS": self._starttls,
        }.get(verb)
        if handler is None:
            await self._reply(index, UNKNOWN_COMMAND)
        else:
            await handler(line, index)

    async def _ehlo(self, line: str, index: int) -> None:
        script = self._owner._snapshot()
        reply = script.ehlo
        if _is_ok(reply):
            first = reply if len(reply.strip()) > 3 else f"{reply.strip()} {HOSTNAME}"
            code = first[:3]
            keywords = [
                ext for ext in script.extensions if not (self._tls and ext.upper() == "STARTTLS")
            ]
            reply = "\n".join([first, *(f"{code} {ext}" for ext in keywords)])
        self._reset_transaction()
        self._greeted = _is_ok(reply)
        await self._reply(index, reply)

    async def _helo(self, line: str, index: int) -> None:
        reply = self._owner._snapshot().helo
        self._reset_transaction()
        self._greeted = _is_ok(reply)
        await self._reply(index, reply)

    async def _mail(self, line: str, index: int) -> None:
        if not self._greeted:
            await self._reply(index, NEED_HELO)
            return
        if self._sender is not None:
            await self._reply(index, NESTED_MAIL)
            return
        script = self._owner._snapshot()
        sender = path_of(line)
        reply = script.mail_by_sender.get(sender, script.mail)
        if _is_ok(reply):
            self._sender = sender
            self._recipients = []
        await self._reply(index, reply)

    async def _rcpt(self, line: str, index: int) -> None:
        script = self._owner._snapshot()
        if self._sender is None:
            await self._reply(index, NEED_MAIL)
            return
        address = path_of(line)
        if script.rcpt_hook is None:
            reply = script.rcpt_reply(address)
        else:
            hooked = script.rcpt_hook(self._owner.session(self._number), address)
            if hooked is None:
                raise _Close
            reply = hooked
        if _is_ok(reply):
            self._recipients.append(address)
        await self._reply(index, reply)

    async def _data(self, line: str, index: int) -> None:
        if self._sender is None:
            await self._reply(index, NEED_RCPT)
            return
        if not self._recipients:
            await self._reply(index, NO_VALID_RCPT)
            return
        reply = self._owner._snapshot().data
        await self._reply(index, reply)
        if not reply.startswith("354"):
            return
        body: list[bytes] = []
        while True:
            raw = await self._readline()
            content = raw.rstrip(b"\n").removesuffix(b"\r")
            if content == b".":
                break
            if content.startswith(b"."):
                content = content[1:]
            body.append(content + b"\r\n")
        end = self._owner._snapshot().data_end
        data_index = self._record(raw)
        if _is_ok(end):
            self._owner._deliver(
                Delivery(self._number, self._sender, tuple(self._recipients), b"".join(body))
            )
            self._errors = 0
        self._reset_transaction()
        await self._reply(data_index, end)

    async def _rset(self, line: str, index: int) -> None:
        reply = self._owner._snapshot().rset
        if _is_ok(reply):
            self._reset_transaction()
        await self._reply(index, reply)

    async def _noop(self, line: str, index: int) -> None:
        await self._reply(index, NOOP_OK)

    async def _starttls(self, line: str, index: int) -> None:
        script = self._owner._snapshot()
        offered = any(ext.upper() == "STARTTLS" for ext in script.extensions)
        if self._tls or not offered:
            await self._reply(index, NOT_IMPLEMENTED)
            return
        if not self._greeted:
            await self._reply(index, NEED_EHLO)
            return
        context: ssl.SSLContext | None = None
        if script.starttls.startswith("220") and script.tls == "ok":
            # Before the 220: once the client has it, its ClientHello may come at any
            # time and must reach the TLS layer, not the plain-text reader.
            try:
                context = self._owner._tls_context()
            except (OSError, RuntimeError, ssl.SSLError):
                await self._reply(index, TLS_UNAVAILABLE)
                return
        ready = script.starttls.startswith("220")
        transport = self._writer.transport
        if ready and isinstance(transport, asyncio.ReadTransport):
            # Whatever the client sends once it has the 220 (its ClientHello) must stay
            # in the socket for the TLS layer, not go to the plain-text reader.
            transport.pause_reading()
        await self._reply(index, script.starttls)
        if not ready:
            return
        if context is None:  # tls == "broken"
            await self._break_tls(transport)
        else:
            await self._writer.start_tls(context)  # resumes reading
        self._tls = True
        self._greeted = False
        self._reset_transaction()

    async def _break_tls(self, transport: asyncio.BaseTransport) -> None:
        """Answer the client's ClientHello with garbage and a FIN, so that its handshake
        fails reading a record that is not TLS. Waiting for the ClientHello first keeps
        the garbage out of the client's plain-text read buffer (where smtplib, for one,
        would swallow it with the 220 and then see a bare EOF). The client's bytes are
        then read and dropped until it closes, so that closing never sends an RST that
        could overtake the garbage."""
        if isinstance(transport, asyncio.ReadTransport):
            transport.resume_reading()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BROKEN_TLS_LINGER):
                await self._reader.read(4096)
        self._writer.write(TLS_GARBAGE)
        if self._writer.can_write_eof():
            self._writer.write_eof()
        await self._writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BROKEN_TLS_LINGER):
                while await self._reader.read(4096):
                    pass
        raise _Close


class ScriptedServer(ThreadedServer, _Commands):
    """An SMTP server on 127.0.0.1:``port`` that answers as its ``Script`` says.

    ``tls_context`` is the server-side context for STARTTLS; by default a certificate
    for ``scripted.test`` and ``127.0.0.1`` issued by the test CA of
    ``tests.harness.tlsutil`` (which ``client_context()`` trusts), made on first use.
    """

    _kind = "scripted-server"

    def __init__(
        self,
        script: Script | None = None,
        *,
        port: int | None = None,
        tls_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(port, host)
        self._lock = threading.Lock()
        self._script = script if script is not None else Script()
        self._commands: list[Command] = []
        self._cleared = 0  # commands forgotten by clear(); record ids count them too
        self._sessions = 0  # sessions started, over all start/stop cycles
        self._open: set[int] = set()  # sessions not closed yet
        self._deliveries: list[Delivery] = []
        self._ssl_context = tls_context

    def _make_protocol(self) -> asyncio.BaseProtocol:
        return _Protocol(self)

    # -- script ------------------------------------------------------------------------

    @property
    def script(self) -> Script:
        """The live script (not a copy)."""
        return self._script

    def update(self, **changes: Any) -> None:
        """Replace ``Script`` fields, all at once as seen by the sessions."""
        unknown = set(changes) - _SCRIPT_FIELDS
        if unknown:
            raise TypeError(f"no such Script field(s): {', '.join(sorted(unknown))}")
        if "tls" in changes and changes["tls"] not in ("ok", "broken"):
            raise ValueError(f"tls must be 'ok' or 'broken', not {changes['tls']!r}")
        with self._lock:
            for name, value in changes.items():
                setattr(self._script, name, value)

    def _snapshot(self) -> Script:
        with self._lock:
            snapshot = copy.copy(self._script)
            for name in ("delay", "mail_by_sender", "rcpt_overrides"):
                setattr(snapshot, name, dict(getattr(snapshot, name)))
            return snapshot

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = server_context(HOSTNAME, self.host)
        return self._ssl_context

    # -- records (written from the loop thread) ----------------------------------------

    def _session_started(self, transport: asyncio.BaseTransport) -> int:
        self._connection_made(transport)
        with self._lock:
            self._sessions += 1
            self._open.add(self._sessions)
            return self._sessions

    def _session_closed(self, session: int) -> None:
        with self._lock:
            self._open.discard(session)

    def _record(self, command: Command) -> int:
        """Record an unanswered command; returns its id for ``_set_reply``."""
        with self._lock:
            self._commands.append(command)
            return self._cleared + len(self._commands) - 1

    def _set_reply(self, record_id: int, reply: str) -> None:
        with self._lock:
            index = record_id - self._cleared
            if 0 <= index < len(self._commands):  # else forgotten by clear() meanwhile
                self._commands[index] = dataclasses.replace(self._commands[index], reply=reply)

    def _deliver(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)

    # -- records (any thread) ----------------------------------------------------------

    @property
    def commands(self) -> list[Command]:
        """Every command line received, in order, over all sessions. The final ``.``
        of DATA is recorded as a command too, with the reply to the message."""
        with self._lock:
            return list(self._commands)

    @property
    def sessions(self) -> list[Session]:
        """Every connection so far (over all start/stop cycles), oldest first, with the
        commands it sent (those ``clear()`` has not forgotten)."""
        with self._lock:
            recorded: dict[int, list[Command]] = {n: [] for n in range(1, self._sessions + 1)}
            for command in self._commands:
                recorded[command.session].append(command)
            return [Session(n, tuple(cs), n not in self._open) for n, cs in recorded.items()]

    def session(self, number: int) -> Session:
        """Connection ``number`` (1 is the first)."""
        with self._lock:
            recorded = tuple(c for c in self._commands if c.session == number)
            if not 1 <= number <= self._sessions:
                raise IndexError(f"no session {number}")
            return Session(number, recorded, number not in self._open)

    @property
    def open_connections(self) -> int:
        """Connections the server is not done with yet."""
        with self._lock:
            return len(self._open)

    def sessions_with_rcpt(self) -> int:
        """How many sessions sent at least one ``RCPT``."""
        return len({c.session for c in self.commands if _starts_with_verb(c.line, "RCPT")})

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    @property
    def messages(self) -> list[bytes]:
        """The bodies of the messages accepted, oldest first."""
        with self._lock:
            return [d.data for d in self._deliveries]

    def mailbox(self, addr: str) -> list[bytes]:
        """The messages delivered to ``addr`` (case-insensitive), oldest first."""
        key = addr.lower()
        with self._lock:
            return [d.data for d in self._deliveries if any(r.lower() == key for r in d.recipients)]

    def clear(self) -> None:
        """Forget recorded commands and messages (not the connection count)."""
        with self._lock:
            self._cleared += len(self._commands)
            self._commands.clear()
            self._deliveries.clear()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ScriptedServer {self.host}:{self.port} {state}>"
